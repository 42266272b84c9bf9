"""What the flexrank cache (`$FLEXRANK_CACHE`) holds, clearing it, and the cap on tokenized data.

Entries are the folders and files directly under each category folder (tokenized/<fingerprint>, models/<name>,
...). A process that uses an entry holds a shared lock on it (`hold`) until it exits, however it exits; clearing
and eviction take the entry's lock exclusively without waiting and leave it alone when they cannot: an entry a
running job uses is never removed. Each use stamps the entry's time, so eviction goes by last use.

Tokenized data grows with every new data set or setting; the other categories hold a few fixed assets. After
each new tokenized entry, the least recently used ones beyond `FLEXRANK_CACHE_MAX_GB` (default 20; 0: no cap)
are evicted.
"""

import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..io import cache_dir

CATEGORIES = ("tokenized", "models", "test-models", "datasets", "downloads", "data", "tokenizers")
DEFAULT_MAX_GB = 20.0
_HELD: dict[Path, int] = {}  # entry -> open lock file (the shared lock lives as long as the descriptor)


@dataclass(frozen=True)
class Entry:
    path: Path
    category: str
    bytes: int
    last_used: float  # seconds since the epoch

    @property
    def in_use(self) -> bool:
        return _in_use(self.path)


def root() -> Path:
    return cache_dir()


def max_bytes() -> int | None:
    """The cap on tokenized data from FLEXRANK_CACHE_MAX_GB (None: no cap)."""
    gb = _non_negative(os.environ.get("FLEXRANK_CACHE_MAX_GB", str(DEFAULT_MAX_GB)), "FLEXRANK_CACHE_MAX_GB",
                       "a size in GB >= 0 (0: no cap)")
    return int(gb * 1e9) if gb else None


def hold(entry: Path) -> None:
    """Mark `entry` in use by this process until it exits (a shared lock), and stamp its last use. Call it before
    checking that the entry exists: an eviction that got there first has then finished."""
    entry = Path(entry)
    if entry not in _HELD:
        fd = os.open(_lock_file(entry), os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        _HELD[entry] = fd
    if entry.exists():
        os.utime(entry)


def entries(category: str | None = None) -> list[Entry]:
    """Every entry of the cache (or of one category), least recently used first."""
    found = []
    for name in [category] if category else CATEGORIES:
        folder = root() / name
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            # hidden: locks and half-written temporaries; *.lock: the asset builders' locks
            if not path.name.startswith(".") and not path.name.endswith(".lock"):
                found.append(Entry(path, name, _size(path), path.lstat().st_mtime))
    return sorted(found, key=lambda e: e.last_used)


def remove(chosen: list[Entry]) -> tuple[list[Entry], list[Entry]]:
    """Delete the chosen entries that no running job uses: (removed, left because in use)."""
    removed, in_use = [], []
    for entry in chosen:
        with _exclusive(entry.path) as free:
            if not free:
                in_use.append(entry)
                continue
            if entry.path.is_dir() and not entry.path.is_symlink():
                shutil.rmtree(entry.path)
            elif entry.path.exists() or entry.path.is_symlink():
                entry.path.unlink()
            removed.append(entry)
    return removed, in_use


def evict(category: str = "tokenized", cap: int | None = None) -> list[Entry]:
    """Remove the least recently used entries of `category` not in use until it holds at most `cap` bytes
    (default: max_bytes()); the removed entries."""
    cap = max_bytes() if cap is None else cap
    if cap is None:
        return []
    listed = entries(category)
    total, over = sum(e.bytes for e in listed), []
    for entry in listed:
        if total <= cap:
            break
        if not entry.in_use:
            over.append(entry)
            total -= entry.bytes
    return remove(over)[0]


def older_than(spec: str) -> float:
    """Seconds in '7d', '12h', '30m' or a number of days."""
    units = {"d": 86400, "h": 3600, "m": 60}
    number, unit = (spec[:-1], spec[-1]) if spec and spec[-1] in units else (spec, "d")
    value = _non_negative(number, "--older-than", "a duration such as 7d, 12h, 30m or a number of days")
    return value * units[unit]


def _non_negative(raw: str, key: str, allowed: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value < 0:
        raise ConfigError(key, raw, allowed)
    return value


def _in_use(path: Path) -> bool:
    with _exclusive(path) as free:
        return not free


@contextmanager
def _exclusive(path: Path) -> Iterator[bool]:
    """Whether no process holds `path` (it is then locked exclusively for the block). The lock file stays
    afterwards: deleting it would let a later locker lock a different file than a waiting one."""
    fd = os.open(_lock_file(path), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _lock_file(entry: Path) -> Path:
    return entry.with_name(f".{entry.name}.inuse")


def _size(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def format_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def age(seconds_ago: float) -> str:
    return f"{seconds_ago / 86400:.1f} d" if seconds_ago >= 86400 else f"{seconds_ago / 3600:.1f} h"


def report(chosen: list[Entry], each: bool = False, now: float | None = None) -> str:
    """The listing `flexrank cache` prints: one line per category (and per entry with `each`)."""
    now = time.time() if now is None else now
    in_use = [e for e in chosen if e.in_use]
    lines = [f"cache: {root()} (tokenized data capped at "
             f"{format_bytes(max_bytes()) if max_bytes() else 'no limit'}: FLEXRANK_CACHE_MAX_GB)",
             f"{'category':<12} {'entries':>7} {'size':>10}"]
    for category in CATEGORIES:
        mine = [e for e in chosen if e.category == category]
        if mine:
            lines.append(f"{category:<12} {len(mine):>7} {format_bytes(sum(e.bytes for e in mine)):>10}")
    lines.append(f"{'total':<12} {len(chosen):>7} {format_bytes(sum(e.bytes for e in chosen)):>10}")
    lines.append(f"in use by running jobs: {len(in_use)} entries ({format_bytes(sum(e.bytes for e in in_use))})")
    for e in chosen if each else ():
        lines.append(f"  {e.category}/{e.path.name}: {format_bytes(e.bytes)}, last used {age(now - e.last_used)} "
                     f"ago{' (in use)' if e.in_use else ''}")
    return "\n".join(lines)
