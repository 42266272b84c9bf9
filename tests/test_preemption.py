"""Preemption outside SLURM: SIGTERM to a 2-process `flexrank train` stops every process at the same step with a
complete checkpoint (no metrics/adapter as if finished), and `--resume auto` ends with the uninterrupted result;
a signal that reaches only one process still stops all of them at the same step (they agree by an all-reduce)."""

import contextlib
import json
import os
import re
import signal
import subprocess
import time

import psutil
import pytest
import yaml
from dist_helpers import assert_same_adapter, metrics, recipe, run, train_args

from flexrank.checkpoints import manifest as checkpoints
from flexrank.checkpoints.preemption import PREEMPTED_EXIT

# No periodic checkpoints: the only checkpoint is the one the signal asks for.
STEPS = {"max_steps": 8, "save_strategy": "no"}


@pytest.fixture(scope="module")
def elastic_run(tmp_path_factory, tiny_llama_dir):
    """(recipe, output of the uninterrupted 2-process run)."""
    tmp = tmp_path_factory.mktemp("preemption")
    path = recipe(tmp, tiny_llama_dir, "elastic", **STEPS)
    run(train_args(path, tmp / "full", "ddp"))
    return path, tmp / "full"


def signal_after_steps(args, steps: int, send) -> tuple[int, str]:
    """Start a run; once `steps` losses were logged call send(process), and again 0.3 s later (while it
    saves); returns (exit status, output)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    lines, logged = [], 0
    for line in proc.stdout:
        lines.append(line)
        logged += "'loss'" in line
        if logged >= steps:
            break
    assert logged >= steps, "".join(lines)[-3000:]
    send(proc)
    time.sleep(0.3)
    send(proc)  # a second signal during the save must not break it
    rest, _ = proc.communicate(timeout=300)
    return proc.returncode, "".join(lines) + rest


def only_checkpoint(out, output) -> tuple:
    saved = list(out.glob("checkpoint-*"))
    assert len(saved) == 1 and checkpoints.problem(saved[0]) is None, output[-3000:]
    assert not (out / "metrics.json").exists() and not (out / "adapter").exists()
    return saved[0], int(saved[0].name.split("-")[1])


def test_sigterm_checkpoints_and_resume_matches_uninterrupted(tmp_path, elastic_run):
    path, full = elastic_run
    stopped = tmp_path / "stopped"
    status, output = signal_after_steps(train_args(path, stopped, "ddp"), 2, lambda p: p.send_signal(signal.SIGTERM))
    assert status == PREEMPTED_EXIT, output[-3000:]
    assert "preempted: " in output
    saved, step = only_checkpoint(stopped, output)
    assert 2 <= step < 8
    proc = run(train_args(path, stopped, "ddp", "--resume", "auto"))
    assert f"resume: {saved}" in proc.stdout
    assert metrics(stopped)["train"]["resumed_from"] == str(saved)
    assert metrics(stopped)["train"]["losses"] == pytest.approx(metrics(full)["train"]["losses"], abs=1e-5)
    assert_same_adapter(full, stopped, atol=1e-5)


def test_a_signal_to_one_process_stops_all_at_the_same_step(tmp_path, elastic_run):
    path, _ = elastic_run
    stopped = tmp_path / "stopped"

    def rank(process) -> str | None:
        try:
            return process.environ().get("RANK")
        except psutil.Error:  # a short-lived helper process that already ended (zombie) or is not ours
            return None

    def signal_rank_1(launcher):  # the accelerate agent's children are the workers
        # The second signal may find rank 1 already gone (it stopped after its checkpoint): nothing to signal then.
        with contextlib.suppress(psutil.NoSuchProcess):
            worker = next((w for w in psutil.Process(launcher.pid).children(recursive=True) if rank(w) == "1"), None)
            if worker is not None:
                worker.send_signal(signal.SIGUSR1)

    status, output = signal_after_steps(train_args(path, stopped, "ddp"), 2, signal_rank_1)
    assert status != 0, output[-3000:]  # the launcher itself got no signal: accelerate reports the workers' 75
    stops = re.findall(r"stopped by SIGUSR1 after step (\d+)", output)
    assert len(stops) == 2 and stops[0] == stops[1], output[-3000:]  # rank 0 was never signalled
    _, step = only_checkpoint(stopped, output)
    assert step == int(stops[0])


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, tiny_llama_dir):
    """(recipe, uninterrupted 2-process LoRA run) with generation-scored evaluations before and after training,
    of 40 held-out records, 1 per batch."""
    tmp = tmp_path_factory.mktemp("eval_preemption")
    path = recipe(tmp, tiny_llama_dir, "lora", max_steps=2, save_strategy="no")
    raw = yaml.safe_load(path.read_text())
    raw["data"]["eval_size"] = 40
    raw["eval"] = {"before": True, "after": True, "batch_size": 1, "metrics": ["loss", "exact_match"]}
    path.write_text(yaml.safe_dump(raw))
    run(train_args(path, tmp / "full", "ddp"))
    return path, tmp / "full"


def test_a_signal_during_the_evaluation_after_training_stops_within_seconds_and_resume_redoes_only_it(
        tmp_path, evaluated_run):
    path, full = evaluated_run
    stopped = tmp_path / "stopped"
    sent = []

    def send(proc):  # after the last step's loss: the step boundary is past, the evaluation after training is next
        if not sent:
            sent.append(time.time())
            proc.send_signal(signal.SIGUSR1)

    status, output = signal_after_steps(train_args(path, stopped, "ddp"), 2, send)
    took = time.time() - sent[0]
    assert status == PREEMPTED_EXIT, output[-3000:]
    assert took < 20, f"{took:.1f} s from the signal to the exit"
    # both workers, then the launcher passing on what they kept
    assert len(re.findall(r"stopped by SIGUSR1 during an evaluation at step 2; checkpoint-2 saved", output)) == 3
    assert "after training:" not in output and not (stopped / "metrics.json").exists()
    assert checkpoints.problem(stopped / "checkpoint-2") is None
    proc = run(train_args(path, stopped, "ddp", "--resume", "auto"))
    assert f"resume: {stopped / 'checkpoint-2'}" in proc.stdout
    done, uninterrupted = metrics(stopped), metrics(full)
    before_kept = json.loads((stopped / "before_metrics.json").read_text())["metrics"]
    assert done["before"] == before_kept  # not evaluated again: the same numbers and the same recorded time
    assert done["train"]["losses"] == pytest.approx(uninterrupted["train"]["losses"], abs=1e-6)
    for phase in ("before", "after"):
        assert done[phase]["exact_match"] == uninterrupted[phase]["exact_match"]
        assert done[phase]["loss"] == pytest.approx(uninterrupted[phase]["loss"], abs=1e-6)
    assert_same_adapter(full, stopped, atol=1e-6)


def test_an_evaluation_stops_at_the_batch_after_the_signal():
    """One process: a signal while batch 2 runs stops the evaluation before batch 3 (the real signal, caught by the
    handlers a run installs)."""
    from flexrank.checkpoints.preemption import Preempted, catch_signals
    from flexrank.evaluation.scoring import _sharded
    from flexrank.evaluation.sharding import Shard

    ran = []

    def batch(items):
        ran.append(items)
        if len(ran) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return items

    restore = catch_signals()
    try:
        with pytest.raises(Preempted, match="stopped by SIGUSR1 during an evaluation"):
            _sharded(list(range(10)), 2, Shard(), None, batch)
    finally:
        restore()
        catch_signals()()  # clear this process's flag for the tests that follow
    assert ran == [[0, 1], [2, 3]]


def test_the_step_agreement_runs_on_host_tensors_over_gloo(tmp_path, monkeypatch):
    """The per-step agreement never touches the GPU: under a default group whose backend takes no CPU tensors
    (NCCL), it all-reduces a host tensor over a gloo group made once over the same processes. Here one gloo process
    poses as NCCL (no NCCL on CPU machines)."""
    import torch.distributed as dist

    from flexrank.checkpoints import preemption

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        assert preemption._host_group() is dist.group.WORLD  # gloo takes CPU tensors: the default group
        monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
        made = []
        new_group = dist.new_group
        monkeypatch.setattr(dist, "new_group", lambda **kw: made.append(kw) or new_group(**kw))
        restore = preemption.catch_signals()
        try:
            assert preemption.agreed_signal(together=True) == 0
            os.kill(os.getpid(), signal.SIGUSR1)
            assert preemption.agreed_signal(together=True) == signal.SIGUSR1
        finally:
            restore()
            preemption.catch_signals()()  # clear this process's flag for the tests that follow
        assert made == [{"backend": "gloo"}]  # made once, at the first agreement
    finally:
        dist.destroy_process_group()
        preemption._HOST_GROUP[:] = [None, None]
