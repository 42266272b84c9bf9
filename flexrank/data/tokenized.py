"""Tokenization as a batched `datasets.map`, run once and kept in the flexrank cache.

The cache entry is named by a fingerprint of everything the tokens depend on (the source's content, the
tokenizer, max_length, loss masking, truncation), so a second run, and every other process of a distributed run,
loads the finished Arrow files instead of tokenizing again. The main process goes first (the others wait, then
load); an entry appears complete or not at all (written beside, then renamed).
"""

import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from . import cache, records as data_lib
from ..io import atomic_path, cache_dir
from ..distributed import env

FORMAT_VERSION = 1  # bump when the tokenization below changes, so old cache entries are not reused
STATS_FILE = "flexrank_stats.json"
_FIT = "flexrank_fit"


@dataclass
class Tokenized:
    dataset: data_lib.TokenizedDataset
    stats: dict  # records, kept, truncated, dropped, seconds (of the tokenization), records_per_s, cached


def content_key(records: list[dict]) -> str:
    """A cache key for records held in memory (the bundled tasks' splits): their content."""
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()


def tokenize_cached(ds, tokenizer, data_cfg, kind: str, source_key: str, name: str = "train",
                    main_process_first=None) -> Tokenized:
    """`ds` (a datasets.Dataset of records) tokenized, from the cache when this exact tokenization exists.

    `main_process_first`: a context manager factory (TrainingArguments.main_process_first); by default
    accelerate's PartialState().main_process_first.
    """
    settings = [FORMAT_VERSION, source_key, _tokenizer_key(tokenizer), kind, data_cfg.max_length,
                data_cfg.response_only_loss, data_cfg.truncation, data_cfg.min_prompt_length]
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:24]
    target = cache_dir("tokenized") / key
    cache.hold(target)  # in use until this process exits: eviction and `flexrank cache --clear` leave it
    if main_process_first is None:
        from accelerate import PartialState

        main_process_first = PartialState().main_process_first
    with main_process_first():
        built = not (target / STATS_FILE).exists()
        if built:
            _build(ds, tokenizer, data_cfg, kind, target)
            for entry in cache.evict("tokenized"):
                print(f"[flexrank] cache: evicted {entry.path} ({cache.format_bytes(entry.bytes)}, least recently "
                      f"used; FLEXRANK_CACHE_MAX_GB caps tokenized data)", flush=True)
        from datasets import load_from_disk

        t0 = time.perf_counter()
        dataset = load_from_disk(str(target))
        stats = {**json.loads((target / STATS_FILE).read_text()), "cached": not built,
                 "load_seconds": round(time.perf_counter() - t0, 3)}
    rank = env.rank()
    if built or rank == 0:  # (a process that tokenizes always says so: only one should)
        how = (f"tokenized in {stats['seconds']:.1f} s ({stats['records_per_s']:,.0f} records/s)" if built
               else f"loaded from the cache in {stats['load_seconds']:.2f} s")
        cut = f"; {stats['truncated']} prompts truncated, {stats['dropped']} records dropped (too long)" \
            if stats["truncated"] or stats["dropped"] else ""
        who = f" (process {rank})" if built and rank else ""
        print(f"[flexrank] {name} data: {stats['records']} records {how}{who} ({target}){cut}", flush=True)
    return Tokenized(data_lib.TokenizedDataset(dataset), stats)


def _build(ds, tokenizer, data_cfg, kind: str, target) -> None:
    from datasets import Features, Sequence, Value

    ids = Sequence(Value("int32"))
    features = Features({"input_ids": ids, "attention_mask": Sequence(Value("int8")), "labels": Value("int64"),
                         _FIT: Value("int8")} if kind == "classification" else
                        {"input_ids": ids, "labels": ids, _FIT: Value("int8")})
    fn = functools.partial(_tokenize_batch, tokenizer=tokenizer, kind=kind, max_length=data_cfg.max_length,
                           response_only=data_cfg.response_only_loss, truncation=data_cfg.truncation,
                           min_prompt_length=data_cfg.min_prompt_length)
    num_proc = data_cfg.num_proc if data_cfg.num_proc and data_cfg.num_proc > 1 and len(ds) > 1 else None
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as scratch:
        t0 = time.perf_counter()
        out = ds.map(fn, batched=True, batch_size=1000, num_proc=num_proc, remove_columns=ds.column_names,
                     features=features, cache_file_name=os.path.join(scratch, "map.arrow"),
                     desc="tokenizing" if len(ds) >= 10_000 else None)
        fit = np.asarray(out.with_format("numpy")[_FIT])
        out = out.select(np.flatnonzero(fit != data_lib.DROPPED)).remove_columns(_FIT)
        seconds = time.perf_counter() - t0
        final = os.path.join(scratch, "final")
        out.save_to_disk(final)
        stats = {"records": len(ds), "kept": len(out), "truncated": int((fit == data_lib.TRUNCATED).sum()),
                 "dropped": int((fit == data_lib.DROPPED).sum()), "seconds": round(seconds, 3),
                 "records_per_s": round(len(ds) / max(seconds, 1e-9), 1)}
        with open(os.path.join(final, STATS_FILE), "w") as f:
            json.dump(stats, f)
        with atomic_path(target, keep_existing=True) as tmp:  # another node's main process may have finished first
            os.replace(final, tmp)
    if not (target / STATS_FILE).exists():
        shutil.rmtree(target, ignore_errors=True)
        raise RuntimeError(f"could not write the tokenization cache {target}")


def _tokenize_batch(batch: dict, tokenizer, kind: str, max_length: int, response_only: bool, truncation: str,
                    min_prompt_length: int) -> dict:
    records = data_lib.records_of_batch(batch)
    if kind == "classification":
        items = [(data_lib.tokenize_classification(tokenizer, r, max_length), data_lib.FITS) for r in records]
    else:
        items = data_lib.tokenize_records(tokenizer, records, max_length, response_only, truncation, min_prompt_length)
    out = {"input_ids": [], "labels": [], _FIT: []}
    if kind == "classification":
        out["attention_mask"] = []
    for item, fit in items:
        item = item or {"input_ids": [], "labels": []}
        for k in out:
            out[k].append(fit if k == _FIT else item[k])
    return out


def _tokenizer_key(tokenizer) -> str:
    """What the tokens depend on in the tokenizer: its vocabulary/merges/normalizer, specials and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    parts = [body, tokenizer.chat_template or "", str(tokenizer.all_special_tokens), tokenizer.eos_token or "",
             type(tokenizer).__name__]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()
