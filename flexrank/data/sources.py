"""Where records come from, read through HF `datasets`: local json/jsonl/csv/parquet/txt files and hub dataset
ids (used from the HF cache, like models: see hub.py), column mapping, and mixing several sources by weight.

Everything returns an Arrow-backed `datasets.Dataset` with the canonical record columns (see data.py), so a
1M-record file is never held as Python objects; tokenization (data_cache.py) maps over it in batches.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io import cache_dir
from ..errors import ConfigError

# The record fields flexrank reads (data.py); data.columns maps these names to a file's own column names.
CANONICAL_COLUMNS = ("system", "instruction", "input", "output", "messages", "text", "label")
TEXT_COLUMNS = ("system", "instruction", "input", "output", "text")
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
SOURCE_HELP = ("a .json list, .jsonl, .csv, .parquet or .txt file, or a hub dataset id (org/name) in the HF cache, "
               "of alpaca {system?, instruction, input?, output}, chat {messages: [{role, content}, ...]} or text "
               "{text} records")
_DATA_FILES = ["*.json", "*.jsonl", "*.csv", "*.parquet", "*.txt", "*.arrow", "**/*.json", "**/*.jsonl",
               "**/*.csv", "**/*.parquet", "**/*.txt", "**/*.arrow", "README.md"]  # data files only: no dataset scripts


@dataclass(frozen=True)
class Source:
    """One data source as the recipe names it; `key` is the recipe key errors are reported under."""
    path: str
    key: str = "data.path"
    name: str | None = None       # hub dataset config
    split: str = "train"          # hub dataset split (slicing like "train[:10%]" works)
    revision: str | None = None
    columns: dict = field(default_factory=dict)
    weight: float = 1.0


def is_hub_dataset(path: str) -> bool:
    """`org/name` that is neither a local path nor a name with a data file's extension (data/train.jsonl)."""
    from ..models.hub import is_hub_id

    p = Path(path).expanduser()
    return is_hub_id(path) and p.suffix not in (*BUILDERS, ".txt") and not p.exists()


def read_source(source: Source):
    """The source as a Dataset with canonical column names (data.columns applied); not yet validated."""
    ds = _read_hub(source) if is_hub_dataset(source.path) else _read_file(source)
    return _rename(ds, source)


def fingerprint_of(source: Source) -> str:
    """What identifies the source's content for the tokenization cache: a file's path, size and mtime, or the hub
    snapshot's commit, plus the column mapping."""
    if is_hub_dataset(source.path):
        where = f"hub:{source.path}@{_hub_snapshot(source)[1]}:{source.name}:{source.split}"
    else:
        p = Path(source.path).resolve()
        stat = p.stat()
        where = f"file:{p}:{stat.st_size}:{stat.st_mtime_ns}"
    return json.dumps([where, sorted(source.columns.items())])


def mix(datasets: list, weights: list[float], seed: int, total: int | None = None):
    """Several sources as one shuffled Dataset in which source i holds round(total * w_i / sum(w)) records.

    `total` defaults to the sum of the sources' sizes. A source with fewer records than its share is repeated (each
    pass over it a fresh permutation); one with more gives a random subset. Deterministic from the seed.
    """
    from datasets import concatenate_datasets

    rng = np.random.default_rng(seed)
    total = total if total is not None else sum(len(d) for d in datasets)
    w = np.asarray(weights, dtype=float)
    counts = np.round(total * w / w.sum()).astype(int)
    parts = []
    for ds, n in zip(datasets, counts):
        passes = [rng.permutation(len(ds)) for _ in range(-(-int(n) // len(ds)))]
        parts.append(ds.select(np.concatenate(passes)[:n]) if n else ds.select([]))
    common = set.intersection(*(set(d.column_names) for d in parts))
    mixed = concatenate_datasets([d.select_columns([c for c in d.column_names if c in common]) for d in parts])
    return mixed.select(rng.permutation(len(mixed)))


def _read_file(source: Source):
    from datasets import Dataset, load_dataset

    path = Path(source.path).expanduser()
    if not path.is_file():
        raise ConfigError(source.key, source.path, SOURCE_HELP, "no such file")
    if path.suffix == ".txt":
        # One record per paragraph (blank-line separated): datasets' text builder would split lines.
        text = path.read_text(encoding="utf-8")
        return Dataset.from_dict({"text": [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]})
    if path.suffix not in BUILDERS:
        raise ConfigError(source.key, source.path, SOURCE_HELP, f"unknown extension {path.suffix!r}")
    try:
        return load_dataset(BUILDERS[path.suffix], data_files=str(path), split="train",
                            cache_dir=str(cache_dir("datasets")))
    except Exception as exc:  # datasets wraps the reader's error; say what is wrong with the file instead
        raise ConfigError(source.key, source.path, SOURCE_HELP, _why_unreadable(path, exc)) from None


def _why_unreadable(path: Path, exc: Exception) -> str:
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                line.strip() and json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {n} is not JSON: {e}"
    if path.suffix == ".json":
        try:
            if not isinstance(json.loads(path.read_text(encoding="utf-8")), list):
                return "a .json file must hold a list of records"
        except json.JSONDecodeError as e:
            return f"not JSON: {e}"
    cause = exc.__cause__ or exc
    return f"unreadable: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"[:300]


def _hub_snapshot(source: Source):
    """(local snapshot folder, commit) of a hub dataset, from the HF cache when offline (HF_HUB_OFFLINE)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        path = Path(snapshot_download(source.path, repo_type="dataset", revision=source.revision,
                                      allow_patterns=_DATA_FILES, local_files_only=constants.HF_HUB_OFFLINE))
    except RevisionNotFoundError:
        raise ConfigError(f"{source.key} revision", source.revision, f"a branch, tag or commit of {source.path}") \
            from None
    except RepositoryNotFoundError:
        raise ConfigError(source.key, source.path, SOURCE_HELP, "not found on the hub (private: log in)") from None
    except LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub is unreachable"
        raise ConfigError(source.key, source.path, f"a hub dataset in the HF cache {constants.HF_HUB_CACHE}",
                          f"{where} and it is not cached") from None
    return path, path.name  # the cache keeps snapshots under snapshots/<commit>


def _read_hub(source: Source):
    from datasets import load_dataset

    folder, _ = _hub_snapshot(source)
    try:  # the snapshot folder read as a local dataset: its README configs and data files, no hub access
        return load_dataset(str(folder), source.name, split=source.split, cache_dir=str(cache_dir("datasets")))
    except (ValueError, KeyError) as exc:
        raise ConfigError(source.key, source.path, f"a config/split the dataset has (name {source.name!r}, split "
                          f"{source.split!r})", str(exc).splitlines()[0][:300]) from None


def _rename(ds, source: Source):
    columns = source.columns or {}
    missing = [f for f in columns.values() if f not in ds.column_names]
    if missing:
        raise ConfigError(f"{source.key.rsplit('.', 1)[0]}.columns", dict(columns),
                          f"columns of {source.path}: {ds.column_names}", f"no column {missing[0]!r} there")
    clash = [c for c in columns if c in ds.column_names and c not in columns.values()]
    if clash:  # the file has its own column of that name too: drop it, the mapping says which one to read
        ds = ds.remove_columns(clash)
    ds = ds.rename_columns({v: k for k, v in columns.items() if k != v})
    return _text_as_strings(ds)


def _text_as_strings(ds):
    """A csv/parquet column of numbers (answers like 42) read as text, as the record fields are strings."""
    from datasets import Value

    for name in TEXT_COLUMNS:
        feature = ds.features.get(name)
        if isinstance(feature, Value) and feature.dtype != "string" and feature.dtype != "null" and \
                (feature.dtype.startswith(("int", "uint", "float")) or feature.dtype == "bool"):
            ds = ds.cast_column(name, Value("string"))
    return ds
