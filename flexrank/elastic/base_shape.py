"""The base model's widths in a subnet (LoNAS elastic base widths): the one form shared by the supernet's masks,
the cost function (cost.py) and the compact export. Widths are always the first channels, as LoNAS cuts them."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerWidths:
    mlp: int | None = None        # MLP intermediate channels kept (gate/up outputs, down inputs); None: all
    attention: int | None = None  # attention q/k/v output channels kept, whole heads (o_proj inputs); None: all


# Layer index (as layer_index reads it from module names) -> its widths; absent layers are full.
BaseWidths = dict[int, LayerWidths]


def layer_index(module_name: str) -> int | None:
    """Decoder-layer index of a module name: `.layers.N.`, else the first numeric path component."""
    for pattern in (r"(?:^|\.)layers\.(\d+)\.", r"(?:^|\.)(\d+)\."):
        match = re.search(pattern, module_name)
        if match:
            return int(match.group(1))
    return None
