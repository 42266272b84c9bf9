"""Preemption outside SLURM: SIGTERM to a 2-process `flexrank train` stops every process at the same step with a
complete checkpoint (no metrics/adapter as if finished), and `--resume auto` ends with the uninterrupted result."""

import os
import signal
import subprocess
import time

import pytest
from dist_helpers import assert_same_adapter, metrics, recipe, run, train_args

from flexrank.trainer import checkpoints
from flexrank.trainer.preemption import PREEMPTED_EXIT

# No periodic checkpoints: the only checkpoint is the one the signal asks for.
STEPS = {"max_steps": 8, "save_strategy": "no"}


def signal_after_steps(args, steps: int, signum=signal.SIGTERM) -> tuple[int, str]:
    """Start a run, send `signum` to the launching process once `steps` losses were logged, and again while
    it saves; returns (exit status, output)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines, logged = [], 0
    for line in proc.stdout:
        lines.append(line)
        logged += "'loss'" in line
        if logged >= steps:
            break
    assert logged >= steps, "".join(lines)[-3000:]
    proc.send_signal(signum)
    time.sleep(0.3)
    proc.send_signal(signum)  # a second signal during the save must not break it
    rest, _ = proc.communicate(timeout=300)
    return proc.returncode, "".join(lines) + rest


@pytest.mark.parametrize("method", ["elastic"])
def test_sigterm_checkpoints_and_resume_matches_uninterrupted(tmp_path, tiny_llama_dir, method):
    path = recipe(tmp_path, tiny_llama_dir, method, **STEPS)
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    run(train_args(path, full, "ddp"))
    status, output = signal_after_steps(train_args(path, stopped, "ddp"), steps=2)
    assert status == PREEMPTED_EXIT, output[-3000:]
    assert "preempted: " in output
    saved = list(stopped.glob("checkpoint-*"))
    assert len(saved) == 1 and checkpoints.problem(saved[0]) is None, output[-3000:]
    step = int(saved[0].name.split("-")[1])
    assert 2 <= step < 8
    assert not (stopped / "metrics.json").exists() and not (stopped / "adapter").exists()
    proc = run(train_args(path, stopped, "ddp", "--resume", "auto"))
    assert f"resume: {saved[0]}" in proc.stdout
    assert metrics(stopped)["train"]["resumed_from"] == str(saved[0])
    assert metrics(stopped)["train"]["losses"] == pytest.approx(metrics(full)["train"]["losses"], abs=1e-5)
    assert_same_adapter(full, stopped, atol=1e-5)
