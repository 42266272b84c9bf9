"""The run's data, recipe to batches: the bundled task or the user's sources (data_sources.py), validated, split
into training and held-out records, tokenized through the cache (data_cache.py), mixed by weight."""

import json
from dataclasses import dataclass

import torch

from . import records as data_lib
from .tokenized import Tokenized, content_key, tokenize_cached
from .sources import Source, fingerprint_of, mix, read_source
from .tasks import task_for
from ..errors import ConfigError


@dataclass
class TrainPart:
    records: object  # datasets.Dataset of records
    key: str         # identifies the records for the tokenization cache
    weight: float = 1.0


@dataclass
class RunData:
    kind: str  # generation | classification | text
    train: list[TrainPart]
    eval: list[dict]
    eval_key: str | None = None

    def train_records(self):
        """Every source's training records as dicts (null fields of mixed-form columns dropped)."""
        for part in self.train:
            for record in part.records:
                yield data_lib.drop_nulls(record)


def load_data(cfg) -> RunData:
    from datasets import Dataset

    d = cfg.data
    if d.task:
        task = task_for(cfg)
        train, held_out = task.split_fn(seed=d.seed, eval_size=d.eval_size, train_size=d.train_size)
        return RunData(task.kind, [TrainPart(Dataset.from_list(train), content_key(train))], held_out,
                       content_key(held_out))
    if d.datasets:
        sources = [Source(s.path, f"data.datasets.{i}.path", s.name, s.split, s.revision, dict(s.columns or {}),
                          s.weight) for i, s in enumerate(d.datasets)]
    else:
        sources = [Source(d.path, "data.path", d.name, d.split, d.revision, dict(d.columns or {}))]
    kinds, parts, held_out = set(), [], []
    weight_sum = sum(s.weight for s in sources)
    for source in sources:
        records, kind = _validated(source, d.format)
        kinds.add(kind)
        key = fingerprint_of(source)
        if d.eval_path or d.eval_split:
            train_records, train_key = records, [key, "all"]
        else:  # a seeded held-out split of the training records (each source its share of eval_size)
            order = torch.randperm(len(records), generator=torch.Generator().manual_seed(d.seed)).tolist()
            n_eval = min(round(d.eval_size * source.weight / weight_sum), len(records) // 5)
            held_out += records.select(order[:n_eval]).to_list()
            train_records, train_key = records.select(order[n_eval:]), [key, "split", d.seed, n_eval]
        if d.train_size and len(sources) == 1:  # with several sources, train_size is the mixture's size
            train_records = train_records.select(range(min(d.train_size, len(train_records))))
            train_key.append(d.train_size)
        parts.append(TrainPart(train_records, json.dumps(train_key), source.weight))
    if len(kinds) > 1:
        raise ConfigError("data.datasets", sorted(kinds), "sources of one kind: all text or all "
                                   "alpaca/chat records")
    eval_source = None
    if d.eval_path:
        eval_source = Source(d.eval_path, "data.eval_path", columns=dict(d.columns or {}))
    elif d.eval_split:
        eval_source = Source(d.path, "data.eval_split", d.name, d.eval_split, d.revision, dict(d.columns or {}))
    if eval_source is not None:
        records, _ = _validated(eval_source, d.format)
        held_out, eval_key = [data_lib.drop_nulls(r) for r in records.to_list()], fingerprint_of(eval_source)
    else:
        eval_key = json.dumps([p.key for p in parts] + ["held-out"])
    return RunData(kinds.pop(), parts, [data_lib.drop_nulls(r) for r in held_out], eval_key)


def tokenize_train(cfg, tokenizer, run_data: RunData, main_process_first=None) -> Tokenized:
    """The training records tokenized (each source through the cache), mixed by weight when there are several."""
    done = [tokenize_cached(p.records, tokenizer, cfg.data, run_data.kind, p.key, "train", main_process_first)
            for p in run_data.train]
    stats = {k: sum(t.stats[k] for t in done) for k in ("records", "kept", "truncated", "dropped", "seconds",
                                                         "load_seconds")}
    stats.update(cached=all(t.stats["cached"] for t in done),
                 records_per_s=round(stats["records"] / max(stats["seconds"], 1e-9), 1))
    if len(done) == 1:
        return Tokenized(done[0].dataset, stats)
    mixed = mix([t.dataset.items for t in done], [p.weight for p in run_data.train], cfg.data.seed,
                cfg.data.train_size)
    return Tokenized(data_lib.TokenizedDataset(mixed), stats)


def tokenize(cfg, tokenizer, records: list[dict], kind: str, key: str | None = None,
             main_process_first=None) -> data_lib.TokenizedDataset:
    """Records held in memory (held-out sets, search subsets) tokenized through the same cached path, with the
    evaluation's length limit (cfg.eval_data)."""
    from datasets import Dataset

    ds = Dataset.from_list(records) if records else Dataset.from_dict({"text": []})
    return tokenize_cached(ds, tokenizer, cfg.eval_data(), kind, key or content_key(records), "held-out",
                           main_process_first).dataset


def _validated(source: Source, fmt: str):
    """(records Dataset, kind) of a source, every record checked before any model loads."""
    ds = read_source(source)
    first = None
    for record in data_lib.validated_records(ds, fmt, source.key, source.path):
        first = first or record
    return ds, "text" if data_lib.record_format(first) == "text" else "generation"
