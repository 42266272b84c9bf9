"""Checkpoints that are either complete or ignored.

The Trainer writes `checkpoint-N/` (ZeRO shards, FSDP2 DCP files, optimizer, RNG, trainer state) from every
process; only when all of them are done does the main process write a manifest of every file and its size
(atomically, last). A checkpoint without a manifest, or whose files no longer match it, is not a checkpoint:
`--resume auto` takes the newest complete one and sets aside newer broken ones with a warning.
"""

import json
import re
import shutil
import time
from pathlib import Path

from ..io import write_atomic
from ..errors import ConfigError

MANIFEST = "flexrank_complete.json"
_STEP = re.compile(r"^checkpoint-(\d+)$")


def mark_complete(folder: Path, meta: dict) -> None:
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    write_atomic(folder / MANIFEST, json.dumps({**meta, "files": files}, indent=1))


def problem(folder: Path) -> str | None:
    """Why `folder` is not a usable checkpoint, or None if it is complete."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return "no completion manifest (interrupted while saving?)"
    except json.JSONDecodeError:
        return "unreadable completion manifest"
    for name, size in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


def meta(folder: Path) -> dict:
    return {k: v for k, v in json.loads((folder / MANIFEST).read_text()).items() if k != "files"}


def _by_step(run_dir: Path) -> list[tuple[int, Path]]:
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return sorted(found)


def latest_complete(run_dir: Path, warn=print, set_aside: bool = True) -> Path | None:
    """The newest complete checkpoint. Newer broken ones are renamed `*.incomplete-<time>` (kept for
    inspection, invisible to the Trainer), each with a warning; only one process should set them aside."""
    for _, path in reversed(_by_step(run_dir)):
        reason = problem(path)
        if reason is None:
            return path
        aside = path.with_name(f"{path.name}.incomplete-{int(time.time())}")
        warn(f"[flexrank] WARNING: {path} is not a complete checkpoint ({reason}); "
             f"{'moved to ' + aside.name + ', ' if set_aside else ''}using the previous one")
        if set_aside:
            path.rename(aside)
    return None


def rotate(run_dir: Path, keep: int | None, protect: str | Path | None = None) -> None:
    """Keep the newest `keep` complete checkpoints, and `protect` (the Trainer's best_model_checkpoint, which
    load_best_model_at_end loads at the end); older ones (complete or not) are deleted."""
    if not keep:
        return
    complete = [p for _, p in _by_step(run_dir) if problem(p) is None]
    if not complete:
        return
    newest_kept = complete[-keep:]
    oldest_kept_step = int(_STEP.match(newest_kept[0].name).group(1))
    protected = Path(protect).resolve() if protect else None
    for step, path in _by_step(run_dir):
        if step < oldest_kept_step and path.resolve() != protected:
            shutil.rmtree(path, ignore_errors=True)


def resolve_resume(value, run_dir: Path, warn=print, set_aside: bool = True) -> Path | None:
    """`auto`: the newest complete checkpoint in run_dir (None to start fresh); a path: that checkpoint,
    which must be complete; None/false: no resume."""
    if value in (None, False, "", "no", "none"):
        return None
    if value in (True, "auto", "latest"):
        found = latest_complete(run_dir, warn, set_aside)
        warn(f"[flexrank] resume: {found}" if found else f"[flexrank] resume: no checkpoint in {run_dir}, starting fresh")
        return found
    path = Path(value)
    reason = problem(path) if path.is_dir() else "not a folder"
    if reason:
        raise ConfigError("training.resume_from_checkpoint", str(value), "auto, or a complete checkpoint folder",
                          reason)
    return path
