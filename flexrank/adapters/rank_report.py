"""The final rank of every adapted module: a CSV table and a layer x module heat map (PNG)."""

import csv
import io
import re
from pathlib import Path

from ..io import atomic_path, write_atomic

_LAYER = re.compile(r"\.layers\.(\d+)\.(.+)$")


def write_rank_report(rank_pattern: dict[str, int], max_rank: int, out_dir: Path) -> None:
    """`rank_pattern` as exported ({module name: rank}; modules left out have rank 0)."""
    rows = []
    for name, rank in sorted(rank_pattern.items()):
        m = _LAYER.search(name)
        rows.append((int(m.group(1)) if m else -1, m.group(2) if m else name, name, rank))
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["layer", "module", "name", "rank"])
    writer.writerows(sorted(rows))
    write_atomic(out_dir / "ranks.csv", table.getvalue())
    _plot(rows, max_rank, out_dir / "ranks.png")


def _plot(rows, max_rank: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = sorted({r[0] for r in rows})
    modules = sorted({r[1] for r in rows})
    grid = np.zeros((len(modules), len(layers)))
    for layer, module, _, rank in rows:
        grid[modules.index(module), layers.index(layer)] = rank
    fig, ax = plt.subplots(figsize=(max(4, len(layers) * 0.35 + 2), len(modules) * 0.45 + 1.5))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max_rank)
    ax.set_xticks(range(len(layers)), layers)
    ax.set_yticks(range(len(modules)), modules)
    ax.set_xlabel("layer")
    ax.set_title(f"final rank per module (total {int(grid.sum())}, max {max_rank})")
    fig.colorbar(image, ax=ax, label="rank")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
