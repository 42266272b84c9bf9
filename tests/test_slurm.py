"""The slurm/ scripts on a real local SLURM cluster (slurm/local_cluster.sh: slurmctld, two slurmd nodes with
/dev/null stand-in GPUs, munge), CPU and gloo: 2 nodes x 1 process = 1 node x 2 processes; a job array sweep
and its collected table; a job signalled before its time limit checkpoints, requeues itself and ends with the
adapter of an uninterrupted run."""

import csv
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from dist_helpers import ROOT, assert_same_adapter, metrics, recipe, train_args

CLUSTER = ROOT / "slurm" / "local_cluster.sh"
SLURM_CONF = Path(os.environ.get("FLEXRANK_SLURM_DIR", "/tmp/flexrank-slurm")) / "etc" / "slurm.conf"
# What every job inherits (sbatch exports the submitting environment): this checkout and interpreter.
JOB_ENV = {**os.environ, "SLURM_CONF": str(SLURM_CONF), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
# The templates ask for 16 CPUs per task; the test nodes have 2 cores.
SMALL = ["--cpus-per-task=1"]


def _sh(*args, check=True, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=JOB_ENV, check=check, timeout=timeout)


@pytest.fixture(scope="module")
def slurm_cluster():
    """The local cluster: used as is when up (CI starts it), else started here and stopped afterwards."""
    if _sh(str(CLUSTER), "status", check=False).returncode == 0:
        yield
        return
    if os.geteuid() != 0 or not (shutil.which("apt-get") or shutil.which("slurmctld")):
        pytest.skip("SLURM cannot be installed here: slurm/local_cluster.sh needs root and apt-get")
    up = _sh(str(CLUSTER), "up", check=False, timeout=600)
    if up.returncode != 0:
        pytest.skip(f"slurm/local_cluster.sh up failed: {up.stderr[-1500:]}")
    yield
    _sh(str(CLUSTER), "down", check=False)


def sbatch(*args: str, cwd: Path) -> str:
    return _sh("sbatch", "--parsable", f"--chdir={cwd}", *args).stdout.strip().split(";")[0]


def job_fields(job: str) -> list[dict]:
    """`scontrol show job` of a job (one dict per array task)."""
    out = _sh("scontrol", "show", "job", "-o", job).stdout
    return [dict(kv.split("=", 1) for kv in line.split() if "=" in kv) for line in out.splitlines() if line]


def wait_for(job: str, timeout: float = 400) -> list[dict]:
    deadline = time.time() + timeout
    while True:
        tasks = job_fields(job)
        if tasks and all(t["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
                         for t in tasks):
            return tasks
        assert time.time() < deadline, tasks
        time.sleep(1)


def wait_for_text(path: Path, pattern: str, count: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not (path.exists() and path.read_text().count(pattern) >= count):
        assert time.time() < deadline, path.read_text()[-3000:] if path.exists() else f"no {path}"
        time.sleep(0.2)


def test_two_nodes_give_the_single_node_losses(slurm_cluster, tmp_path, tiny_llama_dir):
    path = recipe(tmp_path, tiny_llama_dir, "lora", max_steps=4)
    one = sbatch(*SMALL, "--gpus-per-node=2", "--output=one.out", str(ROOT / "slurm/train_single_node.sbatch"),
                 str(path), "--backend", "ddp", "--set", f"training.output_dir={tmp_path / 'one'}", cwd=tmp_path)
    two = sbatch(*SMALL, "--nodes=2", "--gpus-per-node=1", "--output=two.out",
                 str(ROOT / "slurm/train_multi_node.sbatch"), str(path), "--backend", "ddp",
                 "--set", f"training.output_dir={tmp_path / 'two'}", cwd=tmp_path)
    for job, name in ((one, "one"), (two, "two")):
        assert wait_for(job)[0]["JobState"] == "COMPLETED", (tmp_path / f"{name}.out").read_text()[-3000:]
    two_log = (tmp_path / "two.out").read_text()
    assert "--num_machines 2 --machine_rank 1" in two_log and "--num_machines 2 --machine_rank 0" in two_log
    m_one, m_two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert m_one["train"]["world_size"] == m_two["train"]["world_size"] == 2
    assert len(m_two["train"]["losses"]) == 4
    assert m_two["train"]["losses"] == pytest.approx(m_one["train"]["losses"], abs=1e-5)
    assert_same_adapter(tmp_path / "one", tmp_path / "two", atol=1e-5)


def test_job_array_sweep_and_collect(slurm_cluster, tmp_path, tiny_llama_dir):
    path = recipe(tmp_path, tiny_llama_dir, "lora", max_steps=2)
    sweep = tmp_path / "sweep"
    rates = ["0.0001", "0.02", "0.005"]  # not in the order of their results, so the sort is seen
    proc = _sh(sys.executable, "-m", "flexrank", "slurm", "sweep", str(path), "--set-grid",
               f"training.learning_rate={','.join(rates)}", "--set-grid", "adapter.r=2", "--out", str(sweep),
               f"--sbatch={' '.join(SMALL)} --gpus-per-node=1 --chdir={tmp_path}", "--submit")
    job = re.search(r"Submitted batch job (\d+)", proc.stdout).group(1)
    tasks = wait_for(job)
    logs = "".join(p.read_text() for p in (sweep / "logs").glob("*.out"))
    assert len(tasks) == 3 and all(t["JobState"] == "COMPLETED" for t in tasks), logs[-3000:]
    for task, rate in enumerate(rates):  # each task trained its own point into its own folder
        cfg = yaml.safe_load((sweep / f"run-{task}" / "config.yaml").read_text())
        assert cfg["training"]["learning_rate"] == float(rate) and cfg["adapter"]["r"] == 2
    final = {task: metrics(sweep / f"run-{task}")["train"]["train_loss"] for task in range(3)}
    assert len(set(final.values())) == 3
    collected = _sh(sys.executable, "-m", "flexrank", "slurm", "collect", str(sweep)).stdout
    with open(sweep / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["task"]) for r in rows] == sorted(final, key=final.get)  # lowest training loss first
    assert [r["training.learning_rate"] for r in rows] == [rates[int(r["task"])] for r in rows]
    assert [float(r["train.train_loss"]) for r in rows] == pytest.approx(sorted(final.values()))
    assert collected == (sweep / "results.md").read_text()
    assert collected.splitlines()[0] == "| task | training.learning_rate | adapter.r | status | train.train_loss |"


@pytest.mark.parametrize("method", ["elastic", "adalora"])
def test_signalled_job_requeues_itself_and_finishes_as_uninterrupted(slurm_cluster, tmp_path, tiny_llama_dir,
                                                                   method):
    path = recipe(tmp_path, tiny_llama_dir, method, max_steps=16)  # long enough to be signalled mid-run
    job = sbatch(*SMALL, "--gpus-per-node=1", "--output=job.out", str(ROOT / "slurm/train_requeue.sbatch"),
                 str(path), "--set", f"training.output_dir={tmp_path / 'job'}", cwd=tmp_path)
    # Meanwhile, the same run without interruption (one process, as the job has one GPU).
    reference = subprocess.Popen(train_args(path, tmp_path / "full", "single", match_two_processes=False),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=JOB_ENV)
    log = tmp_path / "job.out"
    wait_for_text(log, "'loss'", 2)
    # What SLURM sends before the time limit with --signal=B:USR1@120, delivered now rather than at +-30 s.
    _sh("scancel", "--batch", "--signal=USR1", job)
    state = wait_for(job, timeout=500)[0]
    _, errors = reference.communicate(timeout=300)
    assert reference.returncode == 0, errors[-3000:]
    text = log.read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", text[-4000:]
    assert "flexrank exited with status 75" in text  # the preempted run: a checkpoint, then requeued
    stopped = int(re.search(r"stopped by SIGUSR1 after step (\d+)", text).group(1))
    assert 2 <= stopped < 16
    assert f"resume: {tmp_path / 'job'}/checkpoint-{stopped}" in text
    assert metrics(tmp_path / "job")["train"]["losses"] == pytest.approx(
        metrics(tmp_path / "full")["train"]["losses"], abs=1e-5)
    assert_same_adapter(tmp_path / "full", tmp_path / "job", atol=1e-5)
    at = {k: float(v) for k, v in re.findall(r"\[slurm\] (USR1|flexrank exited with status 75|job \d+ starts "
                                             r"\(restart 1\)) at ([0-9.]+)", text)}
    stop, restart = at["flexrank exited with status 75"], at[f"job {job} starts (restart 1)"]
    print(f"[{method}] signal -> checkpointed exit {stop - at['USR1']:.1f} s; exit -> requeued job starts "
          f"{restart - stop:.1f} s")


def test_sweep_grid_and_bad_input(tmp_path):
    """No cluster needed: the grid's points and order, and one-line errors (exit 2) for bad input."""
    from flexrank.launcher.slurm import grid_points

    assert grid_points(["a=1,2", "b=x,y"]) == [["a=1", "b=x"], ["a=1", "b=y"], ["a=2", "b=x"], ["a=2", "b=y"]]
    for args, message in ((["sweep", "analogy_lora", "--set-grid", "a=1,", "--out", str(tmp_path / "s")],
                           "--set-grid: got 'a=1,'"),
                          (["collect", str(tmp_path)], "SWEEP_DIR: got")):
        proc = subprocess.run([sys.executable, "-m", "flexrank", "slurm", *args], capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "s").exists()
