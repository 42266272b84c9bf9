"""Elastic base widths in the supernet (LoNAS): masks on activations, never on the frozen base's weights.

Keeping the first w MLP intermediate channels (gate/up outputs, their lora_B rows, down inputs, down's lora_A
columns) is exactly zeroing channels w.. of the input of down_proj: every dropped channel only ever flows into it.
Dropping trailing attention heads is zeroing their slice of the attention-output projection's input (heads are
contiguous blocks there and attend independently). So one forward pre-hook per layer does the whole cut: no weight
is sliced, gathered or written, which keeps it exact under ZeRO-3 / FSDP2 sharding, gradient checkpointing
(the recomputed forward sees the same mask) and 4-bit bases.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .base_shape import layer_index

# The projection whose INPUT carries the elastic width, per architecture family (names as in transformers):
# Llama/Mistral/Qwen/SmolLM2 `mlp.down_proj`, BLOOM `mlp.dense_4h_to_h`, BERT/MiniLM `layer.N.output.dense`.
_MLP = re.compile(r"(?:\.mlp\.(?:down_proj|dense_4h_to_h)|(?<!attention)\.output\.dense)$")
# Llama family `self_attn.o_proj`, BERT `attention.output.dense`, BLOOM `self_attention.dense`.
_ATTENTION = re.compile(r"\.(?:self_attn\.o_proj|attention\.output\.dense|self_attention\.dense)$")
KINDS = ("mlp", "attention")


@dataclass(frozen=True)
class BaseTarget:
    """One elastic base width of one layer: the module whose input is masked, its full width, and the step
    widths must be multiples of (attention: whole heads, whole key/value groups under GQA)."""

    layer: int
    kind: str
    module: str
    size: int
    unit: int = 1


def _attention_unit(config) -> int:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    # Under grouped-query attention a key/value head serves heads // kv_heads query heads: dropping whole
    # groups keeps the cut expressible as a smaller model (k/v sliced too).
    return head_dim * (heads // kv_heads)


def find_base_targets(model: nn.Module) -> dict[tuple[int, str], BaseTarget]:
    """(layer index, kind) -> target, for every decoder/encoder layer the model has."""
    config = getattr(model, "config", None)
    targets: dict[tuple[int, str], BaseTarget] = {}
    for name, module in model.named_modules():
        for kind, pattern in (("mlp", _MLP), ("attention", _ATTENTION)):
            if not pattern.search(name):
                continue
            layer, size = layer_index(name), getattr(module, "in_features", None)
            if layer is None or not isinstance(size, int):
                continue
            unit = _attention_unit(config) if kind == "attention" and config is not None else 1
            targets[layer, kind] = BaseTarget(layer, kind, name, size, unit)
    return dict(sorted(targets.items()))


class BaseMasks:
    """Forward pre-hooks keeping the first `width` input channels of each target module (the rest zeroed)."""

    def __init__(self, model: nn.Module, sizes: dict[str, int]):
        modules = dict(model.named_modules())
        self.sizes = dict(sizes)
        self.widths = dict(sizes)  # full width: the hook is a no-op
        self._keep: dict[str, tuple[tuple, torch.Tensor]] = {}  # name -> (width, size, device, dtype), its mask
        self.handles = [modules[name].register_forward_pre_hook(self._hook(name)) for name in self.sizes]

    def set_widths(self, widths: dict[str, int]) -> None:
        for name, width in widths.items():
            if not 0 < width <= self.sizes[name]:
                raise ValueError(f"{name}: width {width} outside 1..{self.sizes[name]}")
            self.widths[name] = width

    def _hook(self, name: str):
        def mask_input(module, args):
            width = self.widths[name]
            x = args[0]
            if width >= x.shape[-1]:
                return None
            return (x * self._mask(name, width, x),) + tuple(args[1:])
        return mask_input

    def _mask(self, name: str, width: int, x: torch.Tensor) -> torch.Tensor:
        """The 0/1 channel mask for `x`, made when the width (or the input's size, device, dtype) changes, not at
        every forward (a normal tensor even under inference_mode: a later training forward saves it for backward)."""
        key = (width, x.shape[-1], x.device, x.dtype)
        cached = self._keep.get(name)
        if cached is None or cached[0] != key:
            with torch.inference_mode(False):
                cached = self._keep[name] = (key, (torch.arange(x.shape[-1], device=x.device) < width).to(x.dtype))
        return cached[1]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
