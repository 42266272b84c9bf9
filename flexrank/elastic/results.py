"""What a search leaves behind: the evaluation cache, the best-subnet rule, search_progression.csv / .png and
search_best.json (NNCF BootstrapNAS's outputs, with flexrank's columns)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..io import atomic_path, write_atomic
from .nsga import pareto_front


def config_key(config: dict[str, int]) -> str:
    return json.dumps(config, separators=(",", ":"))


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class EvalCache:
    """Append-only JSONL of evaluated subnets, one file per evaluation setup (supernet weights + held-out
    records + metric): an interrupted search resumes without re-evaluating, and other processes or array
    tasks reuse each other's results. One os.write of one line per result, in O_APPEND mode, so concurrent
    writers never interleave; a torn last line (a killed writer) is skipped when read."""

    def __init__(self, path: Path):
        self.path = path
        self.results: dict[str, float] = {}
        self.refresh()

    def refresh(self) -> None:
        if not self.path.exists():
            return
        for line in self.path.read_text().splitlines():
            try:
                entry = json.loads(line)
                self.results[entry["key"]] = float(entry["metric"])
            except (ValueError, KeyError, TypeError):
                continue

    def get(self, config: dict[str, int]) -> float | None:
        return self.results.get(config_key(config))

    def put(self, config: dict[str, int], metric: float) -> None:
        key = config_key(config)
        self.results[key] = metric
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps({"key": key, "metric": metric}) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


@dataclass
class Row:
    generation: int | str   # a number for search candidates, "baseline" for the reference subnets
    source: str             # "nsga2", "maximal", "heuristic", "minimal", "nls_frequent", "nls_loss_1", ...
    config: dict[str, int]
    metric: float
    cost: dict[str, int] = field(default_factory=dict)


@dataclass
class Best:
    row: Row
    qualified: bool
    threshold: float
    note: str


def select_best(rows: list[Row], ref: float, delta: float, higher_is_better: bool = True,
                objective: str = "macs") -> Best:
    """NNCF's rule: the lowest-cost subnet whose metric is within `delta` of `ref` (>= ref - delta; for a loss,
    <= ref + delta). When none is, NNCF warned and kept the input model; flexrank says so and takes the best metric."""
    threshold = ref - delta if higher_is_better else ref + delta
    ok = [r for r in rows if (r.metric >= threshold if higher_is_better else r.metric <= threshold)]
    sign = 1 if higher_is_better else -1
    if ok:
        row = min(ok, key=lambda r: (r.cost[objective], -sign * r.metric))
        return Best(row, True, threshold, f"lowest {objective} with metric {'>=' if sign > 0 else '<='} {threshold:.4g}")
    row = max(rows, key=lambda r: (sign * r.metric, -r.cost[objective]))
    return Best(row, False, threshold, f"no subnet reached {threshold:.4g}: took the best metric")


COLUMNS = ["generation", "source", "params", "macs", "base_params", "base_macs", "adapter_params", "adapter_macs",
           "metric", "config"]


def write_csv(path: Path, rows: list[Row]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({"generation": r.generation, "source": r.source, **{k: r.cost[k] for k in COLUMNS[2:8]},
                         "metric": repr(r.metric), "config": config_key(r.config)})
    write_atomic(path, buf.getvalue())


def front_rows(rows: list[Row], objective: str = "macs", higher_is_better: bool = True) -> list[Row]:
    sign = 1 if higher_is_better else -1
    return [rows[i] for i in pareto_front([(r.cost[objective], sign * r.metric) for r in rows])]


def plot(path: Path, rows: list[Row], best: Best, metric_name: str, objective: str = "macs",
         higher_is_better: bool = True) -> None:
    """Cost vs metric of every evaluated subnet, coloured by generation; the Pareto front, the reference
    subnets and the chosen one marked (NNCF drew the input model and the best the same way)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 1e6
    fig, ax = plt.subplots(figsize=(8, 5.5))
    searched = [r for r in rows if isinstance(r.generation, int)]
    if searched:
        points = ax.scatter([r.cost[objective] / scale for r in searched], [r.metric for r in searched],
                            c=[r.generation for r in searched], cmap="viridis", s=18, alpha=0.8, label="searched")
        fig.colorbar(points, ax=ax, label="generation")
    front = front_rows(rows, objective, higher_is_better)
    ax.step([r.cost[objective] / scale for r in front], [r.metric for r in front], where="post", color="tab:red",
            lw=1.2, label="Pareto front")
    markers = {"maximal": ("s", "tab:blue"), "heuristic": ("D", "tab:orange"), "minimal": ("v", "tab:purple")}
    for r in rows:
        if r.source in markers:
            m, c = markers[r.source]
            ax.scatter(r.cost[objective] / scale, r.metric, marker=m, color=c, s=70, edgecolor="k", label=r.source,
                       zorder=3)
        elif r.source.startswith("nls_"):
            ax.scatter(r.cost[objective] / scale, r.metric, marker="P", color="tab:gray", s=50, edgecolor="k",
                       label="NLS candidates", zorder=3)
    ax.scatter(best.row.cost[objective] / scale, best.row.metric, marker="*", color="gold", s=260, edgecolor="k",
               label="chosen", zorder=4)
    ax.axhline(best.threshold, color="gray", ls=":", lw=1, label="ref_acc - acc_delta")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="lower right")
    ax.set_xlabel(f"{'MACs' if objective == 'macs' else 'parameters'} per token (millions; base + adapter)")
    ax.set_ylabel(metric_name)
    ax.set_title("flexrank search: NSGA-II over the elastic supernet")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
