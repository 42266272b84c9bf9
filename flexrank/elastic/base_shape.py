"""The base model's widths in a subnet (LoNAS elastic base widths): the one form shared by the supernet's masks,
the cost function (cost.py) and the compact export. Widths are always the first channels, as LoNAS cuts them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerWidths:
    mlp: int | None = None        # MLP intermediate channels kept (gate/up outputs, down inputs); None: all
    attention: int | None = None  # attention q/k/v output channels kept, whole heads (o_proj inputs); None: all


# Layer index (as search_space.layer_index reads it from module names) -> its widths; absent layers are full.
BaseWidths = dict[int, LayerWidths]
