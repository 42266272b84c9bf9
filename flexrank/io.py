"""Outputs that appear whole or not at all: write next to the destination, then rename over it.

A reader (export, eval, a resumed run, another process) sees the previous version or the new one, never a
half-written file or folder, even when the writer is killed midway.
"""

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path (not yet created) for the caller to write a file or a folder into; when
    the block ends without error it replaces `dest` (a folder is swapped: old one renamed aside, then removed)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")  # hidden, so no glob for checkpoints picks it up
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if tmp.is_dir() and dest.is_dir():
        # rename(2) cannot replace a non-empty folder: move the old one aside first.
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        _remove(old)
        os.replace(dest, old)
        os.replace(tmp, dest)
        _remove(old)
    else:
        os.replace(tmp, dest)


def write_atomic(dest: str | Path, data: str | bytes) -> None:
    """Write a whole file atomically (flushed to disk before the rename)."""
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
