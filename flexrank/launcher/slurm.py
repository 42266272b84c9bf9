"""`flexrank slurm`: job array sweeps on SLURM.

`sweep` writes SWEEP_DIR/sweep.txt, one grid point a line ("KEY=VALUE KEY=VALUE", each pair a --set override
for one array task of slurm/sweep.sbatch), and prints (or submits) the sbatch command. `collect` reads each
task's SWEEP_DIR/run-I/metrics.json and writes results.csv and results.md, best run first.
"""

import csv
import io
import itertools
import json
import shlex
import shutil
import subprocess
from pathlib import Path

from ..errors import ConfigError
from ..io import write_atomic
from ..shipped import SLURM, shipped_file

SWEEP_FILE = "sweep.txt"
SWEEP_SCRIPT = shipped_file(SLURM, "sweep.sbatch")


def _ranking() -> list[tuple[tuple[str, str], bool]]:
    """(metrics.json path, higher is better) in the order the metric resolver judges runs by (the task metrics,
    then the held-out loss), then the training loss; the first one every finished run has decides the order."""
    from ..evaluation.metrics import TASK_METRICS, higher_is_better

    return [(("after", m), higher_is_better(m)) for m in (*TASK_METRICS, "loss")] + [(("train", "train_loss"), False)]


def grid_points(grid: list[str]) -> list[list[str]]:
    """["a=1,2", "b=x,y"] -> [["a=1", "b=x"], ["a=1", "b=y"], ["a=2", "b=x"], ["a=2", "b=y"]]."""
    axes = []
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not key or not values or "" in values.split(",") or " " in item:
            raise ConfigError("--set-grid", item, "KEY=V1,V2,... (no spaces, no empty values)")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(point) for point in itertools.product(*axes)]


def write_sweep(sweep_dir: Path, points: list[list[str]]) -> Path:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / SWEEP_FILE
    write_atomic(path, "".join(" ".join(p) + "\n" for p in points))
    return path


def sbatch_command(recipe: str, sweep_dir: Path, n_points: int, sbatch_args: list[str],
                   train_args: list[str]) -> list[str]:
    return (["sbatch", f"--array=0-{n_points - 1}", f"--output={sweep_dir}/logs/%A_%a.out"] + sbatch_args
            + [str(SWEEP_SCRIPT), recipe, str(sweep_dir)] + train_args)


def sweep(recipe: str, grid: list[str], sweep_dir: Path, sbatch_args: list[str], train_args: list[str],
          submit: bool) -> int:
    points = grid_points(grid)
    if submit and shutil.which("sbatch") is None:
        raise ConfigError("--submit", True, "a machine with SLURM's sbatch on PATH", "leave it out to print the command")
    write_sweep(sweep_dir, points)
    (sweep_dir / "logs").mkdir(exist_ok=True)
    cmd = sbatch_command(recipe, sweep_dir.resolve(), len(points), sbatch_args, train_args)
    print(f"[flexrank] {len(points)} sweep points in {sweep_dir / SWEEP_FILE}")
    print(" ".join(shlex.quote(c) for c in cmd), flush=True)
    return subprocess.run(cmd).returncode if submit else 0


def _get(metrics: dict, path: tuple[str, ...]):
    for key in path:
        metrics = metrics.get(key) if isinstance(metrics, dict) else None
    return metrics if isinstance(metrics, (int, float)) else None


def collect(sweep_dir: Path) -> list[dict]:
    """One row per sweep point (its overrides and metrics; status `missing` while a task has not finished),
    best first; written to results.csv and results.md."""
    try:
        points = (sweep_dir / SWEEP_FILE).read_text().splitlines()
    except FileNotFoundError:
        raise ConfigError("SWEEP_DIR", str(sweep_dir), f"a folder with {SWEEP_FILE} (written by flexrank slurm "
                          "sweep)") from None
    runs = []
    for task, line in enumerate(points):
        metrics_file = sweep_dir / f"run-{task}" / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        runs.append((task, dict(kv.split("=", 1) for kv in line.split()), metrics))
    finished = [m for _, _, m in runs if m]
    ranks = _ranking()
    ranking = next(((path, higher) for path, higher in ranks if finished
                    and all(_get(m, path) is not None for m in finished)), None)
    rows = []
    for task, overrides, metrics in runs:
        row = {"task": task, **overrides, "status": "done" if metrics else "missing"}
        for path, _ in ranks:
            if (value := _get(metrics, path)) is not None:
                row[".".join(path)] = value
        rows.append(row)
    if ranking:
        name, higher = ".".join(ranking[0]), ranking[1]
        rows.sort(key=lambda r: (name not in r, -r[name] if higher and name in r else r.get(name, 0)))
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(sweep_dir / "results.csv", buffer.getvalue())
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    table += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    write_atomic(sweep_dir / "results.md", "\n".join(table) + "\n")
    return rows


def _cell(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
