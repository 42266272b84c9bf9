"""Checkpoints and resume: a run killed (SIGKILL, possibly mid-step or mid-save) and resumed gives the same
per-step losses and adapter as an uninterrupted run (ZeRO-3, FSDP2); a broken newest checkpoint is detected
and the previous one used; a resume with another world size continues from the right sample."""

import os
import random
import signal
import subprocess
import time

import psutil
import pytest
from dist_helpers import assert_same_adapter, metrics, recipe, run, train_args

from flexrank.checkpoints import manifest as checkpoints

CKPT = {"max_steps": 8, "save_strategy": "steps", "save_steps": 2}
LONG = {"max_steps": 12, "save_strategy": "steps", "save_steps": 2}


def kill_after_first_checkpoint(args, out, seed):
    """Start a run, wait for its second complete checkpoint, then SIGKILL every process a random moment later
    (mid-step, or mid-save: then the newest checkpoint is incomplete and must be passed over)."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while not (out / "checkpoint-4" / checkpoints.MANIFEST).exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its checkpoint"
        time.sleep(0.02)
    time.sleep(random.Random(seed).uniform(0.0, 0.4))
    # The launcher and every worker (torchrun starts workers in sessions of their own), as a preemption would.
    tree = [proc.pid] + [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]
    for pid in tree:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    return proc.returncode


@pytest.mark.parametrize("backend, method", [("zero3", "elastic"), ("fsdp2", "elastic"), ("zero3", "adalora")])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_llama_dir, backend, method):
    """AdaLoRA: killed in the middle of budgeting (steps 2..9 of 12); its importance EMAs and masks resume too."""
    path = recipe(tmp_path, tiny_llama_dir, method, **LONG)
    full, killed = tmp_path / "full", tmp_path / "killed"
    run(train_args(path, full, backend))
    assert kill_after_first_checkpoint(train_args(path, killed, backend), killed, seed=len(backend)) == -9
    assert not (killed / "metrics.json").exists()
    proc = run(train_args(path, killed, backend, "--resume", "auto"))
    assert "[flexrank] resume: " in proc.stdout
    resumed_from = metrics(killed)["train"]["resumed_from"]
    assert resumed_from and int(resumed_from.rsplit("-", 1)[1]) < 12
    assert metrics(killed)["train"]["losses"] == pytest.approx(metrics(full)["train"]["losses"], abs=1e-5)
    assert_same_adapter(full, killed)
    assert metrics(killed)["export"]["rank_pattern"] == metrics(full)["export"]["rank_pattern"]


@pytest.mark.parametrize("method", ["lora", "sora", "adalora"])
def test_broken_newest_checkpoint_is_set_aside(tmp_path, tiny_llama_dir, method):
    path = recipe(tmp_path, tiny_llama_dir, method, **CKPT)
    out, full = tmp_path / "run", tmp_path / "full"
    run(train_args(path, full, "single"))
    run(train_args(path, out, "single"))
    reference = metrics(out)["train"]["losses"]
    # Newest: a file cut short (as by a full disk); next: never finished (no manifest).
    optimizer = out / "checkpoint-8" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    (out / "checkpoint-6" / checkpoints.MANIFEST).unlink()
    warnings = []
    assert checkpoints.resolve_resume("auto", out, warn=warnings.append) == out / "checkpoint-4"
    assert "optimizer.pt has 100 bytes" in warnings[0] and "no completion manifest" in warnings[1]
    assert sorted(p.name.split(".")[0] for p in out.glob("checkpoint-*.incomplete-*")) == ["checkpoint-6",
                                                                                          "checkpoint-8"]
    (out / "metrics.json").unlink()
    run(train_args(path, out, "single", "--resume", "auto"))
    assert metrics(out)["train"]["losses"] == pytest.approx(reference, abs=1e-6)
    assert metrics(out)["train"]["resumed_from"].endswith("checkpoint-4")
    assert_same_adapter(full, out, atol=1e-6)
    assert metrics(out)["export"]["rank_pattern"] == metrics(full)["export"]["rank_pattern"]


def test_explicit_broken_checkpoint_is_a_clear_error(tmp_path, tiny_llama_dir):
    path = recipe(tmp_path, tiny_llama_dir, "lora")
    broken = tmp_path / "checkpoint-3"
    broken.mkdir()
    proc = subprocess.run(train_args(path, tmp_path / "run", "single", "--resume", str(broken)),
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "training.resume_from_checkpoint" in proc.stderr and "no completion manifest" in proc.stderr


def test_save_total_limit_keeps_newest_complete(tmp_path, tiny_llama_dir):
    path = recipe(tmp_path, tiny_llama_dir, "lora", save_total_limit=2, **CKPT)
    out = tmp_path / "run"
    run(train_args(path, out, "single"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    assert all(checkpoints.problem(p) is None for p in out.glob("checkpoint-*"))


def test_resume_with_another_world_size(tmp_path, tiny_llama_dir):
    """2 processes -> 1: gradient accumulation doubles, so each step sees the same 8 samples as before."""
    path = recipe(tmp_path, tiny_llama_dir, "lora", max_steps=8, save_strategy="steps", save_steps=4)
    out = tmp_path / "run"
    run(train_args(path, out, "ddp"))
    reference = metrics(out)["train"]["losses"]
    full = tmp_path / "full"
    os.rename(out, full)
    os.makedirs(out)
    os.rename(full / "checkpoint-4", out / "checkpoint-4")
    proc = run(train_args(path, out, "single", "--resume", "auto", match_two_processes=False))
    assert "world size 2 -> 1; gradient_accumulation_steps 1 -> 2" in proc.stdout
    assert "continues at sample 32" in proc.stdout
    assert metrics(out)["train"]["losses"] == pytest.approx(reference, abs=1e-5)
    assert_same_adapter(full, out)
