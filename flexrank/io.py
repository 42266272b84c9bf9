"""Files: the one atomic writer, and the cache folder.

Every output (a result, a cache entry, a checkpoint file, an export) is written next to its destination, then
renamed over it: a reader (export, eval, a resumed run, another process) sees the previous version or the new one,
never a half-written file or folder, even when the writer is killed midway. The cache folder holds expensive shared
artefacts (converted models, fetched data sets, tokenized data).

Output folders (a run's adapter/, supernet/, sparse_base/ and search/, an export, a compacted model) carry a
marker: flexrank replaces or writes into such a folder only when it is new, empty or marked, and checks that
before any work, so an output path pointed at the wrong folder loses nothing.
"""

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import ConfigError

OWNED_MARKER = ".flexrank"  # in every output folder flexrank writes: the only non-empty folders it replaces
LEGACY_MARKERS = ("flexrank_export.json",)  # exports written before the marker existed carry their summary


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_path(dest: str | Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path (not yet created) for the caller to write a file or a folder into; when
    the block ends without error it replaces `dest` (a folder is swapped: old one renamed aside, then removed).
    `keep_existing`: a `dest` that appeared meanwhile (another process wrote the same entry) wins; ours is dropped."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")  # hidden, so no glob for checkpoints picks it up
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if keep_existing and dest.exists():
        _remove(tmp)
        return
    if tmp.is_dir() and dest.is_dir():
        # rename(2) cannot replace a non-empty folder: move the old one aside first.
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        _remove(old)
        os.replace(dest, old)
        os.replace(tmp, dest)
        _remove(old)
    else:
        os.replace(tmp, dest)


def is_replaceable(folder: Path) -> bool:
    """A folder flexrank may replace or write into: absent, empty, or marked as written by flexrank."""
    folder = Path(folder)
    if not folder.exists():
        return True
    return folder.is_dir() and not folder.is_symlink() and (
        not any(folder.iterdir()) or any((folder / m).is_file() for m in (OWNED_MARKER, *LEGACY_MARKERS)))


def refuse_foreign(folder: str | Path, key: str) -> None:
    """A ConfigError naming `folder` (set by `key`) when it holds files flexrank did not write."""
    if not is_replaceable(Path(folder)):
        raise ConfigError(key, str(folder), f"a new or empty folder, or one flexrank wrote (with {OWNED_MARKER})",
                          "it holds other files, which flexrank will not replace or delete; move it or choose "
                          "another path")


def mark_owned(folder: str | Path) -> None:
    """Mark a folder as written by flexrank (see refuse_foreign)."""
    (Path(folder) / OWNED_MARKER).write_text("written by flexrank; it may replace this folder\n")


@contextmanager
def output_folder(dest: str | Path, key: str) -> Iterator[Path]:
    """A fresh, marked folder for the caller to fill, swapped in whole for `dest` when the block ends; a foreign
    `dest` is refused first (callers check it up front too, before any work: refuse_foreign)."""
    refuse_foreign(dest, key)
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        mark_owned(tmp)
        yield tmp


def write_atomic(dest: str | Path, data: str | bytes) -> None:
    """Write a whole file atomically (flushed to disk before the rename)."""
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())


def write_json(dest: str | Path, data) -> None:
    write_atomic(dest, json.dumps(data, indent=2, default=str))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir(*parts: str) -> Path:
    """`$FLEXRANK_CACHE` (default `~/.cache/flexrank`), joined with `parts` and created."""
    root = Path(os.environ.get("FLEXRANK_CACHE", Path.home() / ".cache" / "flexrank"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
