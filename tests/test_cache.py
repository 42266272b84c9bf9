"""The flexrank cache: `flexrank cache` lists and clears it, tokenized data is capped by least recent use, and an
entry a running job uses is never removed (a shared lock held until the job's process exits)."""

import contextlib
import os
import subprocess
import sys
import textwrap
import time

import pytest

from flexrank.data import cache

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from flexrank.data.cache import hold
    hold(Path(sys.argv[1]))
    print("holding", flush=True)
    time.sleep(600)
""")


@pytest.fixture()
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXRANK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _entry(root, name: str, size: int, hours_ago: float, category: str = "tokenized"):
    path = root / category / name
    path.mkdir(parents=True)
    (path / "data.arrow").write_bytes(b"x" * size)
    _last_used(path, hours_ago)
    return path


def _last_used(path, hours_ago: float) -> None:
    stamp = time.time() - hours_ago * 3600
    os.utime(path, (stamp, stamp))


@contextlib.contextmanager
def _running_job_holding(path, since_hours: float):
    """Another process (a running job) that uses `path` until it is killed, and started using it long ago."""
    job = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert job.stdout.readline().strip() == "holding"
        _last_used(path, since_hours)  # holding stamps the use: set it back, as for a job that started then
        yield job
    finally:
        job.kill()
        job.wait()


def test_the_cap_evicts_least_recently_used_first_and_keeps_an_entry_a_running_job_uses(cache_root):
    a, b, c, d = (_entry(cache_root, n, 1000, hours) for n, hours in (("a", 4), ("b", 3), ("c", 2), ("d", 1)))
    with _running_job_holding(a, since_hours=4):
        evicted = cache.evict("tokenized", cap=2500)
        # 4000 bytes over a 2500 cap: a is the oldest but in use, so b then c go (down to a + d = 2000)
        assert [e.path for e in evicted] == [b, c]
        assert a.exists() and d.exists() and not b.exists() and not c.exists()
        assert [e.path for e in cache.evict("tokenized", cap=500)] == [d]  # still over, but a is in use
        assert a.exists()
    evicted = cache.evict("tokenized", cap=500)  # the job ended (killed): its lock went with it
    assert [e.path for e in evicted] == [a]


def test_flexrank_cache_lists_sizes_and_clears_old_entries_but_not_those_in_use(cache_root, capsys):
    from flexrank.launcher.cli import main

    old = _entry(cache_root, "old", 3000, 48)
    old_in_use = _entry(cache_root, "old_in_use", 500, 72)
    recent = _entry(cache_root, "recent", 2000, 1)
    model = _entry(cache_root, "some-model", 7000, 100, category="models")
    assert main(["cache"]) == 0
    listing = capsys.readouterr().out
    assert "tokenized          3     5.5 KB" in listing and "models             1     7.0 KB" in listing
    assert "total              4    12.5 KB" in listing
    with _running_job_holding(old_in_use, since_hours=72):
        assert main(["cache", "--entries"]) == 0
        assert "tokenized/old_in_use: 500 B, last used 3.0 d ago (in use)" in capsys.readouterr().out
        assert main(["cache", "--clear", "--older-than", "1d", "--category", "tokenized"]) == 0
        said = capsys.readouterr().out
    assert "removed 1 entries (3.0 KB); kept 1 in use by a running job" in said
    assert not old.exists() and old_in_use.exists() and recent.exists() and model.exists()
    assert main(["cache", "--clear"]) == 0
    assert not any(p.exists() for p in (old_in_use, recent, model))


def test_tokenized_data_is_held_while_used_and_a_new_entry_evicts_beyond_the_cap(tiny_llama_dir, tmp_path, monkeypatch):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from flexrank.config import DataConfig
    from flexrank.data.tokenized import tokenize_cached

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)  # SmolLM2's, from the shared cache
    cache_root = tmp_path / "cache"
    monkeypatch.setenv("FLEXRANK_CACHE", str(cache_root))
    stale = _entry(cache_root, "stale", 50_000, 24)
    monkeypatch.setenv("FLEXRANK_CACHE_MAX_GB", "0.00004")  # 40 kB: the stale entry and the new one do not fit
    records = [{"instruction": f"say {i}", "output": str(i)} for i in range(20)]
    tokenize_cached(Dataset.from_list(records), tokenizer, DataConfig(task=None, path="x.jsonl"), "generation",
                    "test-source", main_process_first=contextlib.nullcontext)
    (entry,) = cache.entries("tokenized")
    assert not stale.exists() and entry.in_use  # held by this process (the test) for as long as it runs


def test_a_bad_cap_is_refused_before_a_run_starts(monkeypatch, capsys, tmp_path):
    from flexrank.launcher.cli import main

    monkeypatch.setenv("FLEXRANK_CACHE_MAX_GB", "lots")
    assert main(["train", "analogy_lora", "--set", f"training.output_dir={tmp_path / 'run'}"]) == 2
    assert "FLEXRANK_CACHE_MAX_GB: got 'lots'; allowed: a size in GB >= 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("age", ["x", "-1", "3w"])
def test_a_bad_age_is_refused_in_one_line(cache_root, capsys, age):
    from flexrank.launcher.cli import main

    kept = _entry(cache_root, "kept", 100, 48)
    assert main(["cache", "--clear", "--older-than", age]) == 2
    assert f"--older-than: got '{age}'; allowed: a duration such as 7d, 12h, 30m or a number of days" in \
        capsys.readouterr().err
    assert kept.exists()
