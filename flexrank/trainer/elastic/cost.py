"""Parameters and multiply-accumulates per token of an active subnet.

NNCF BootstrapNAS counts, over Linear layers, params = in x out and MACs = in x out per token. Here the base
model's Linear layers (including the output head) are counted that way, and the active adapter ranks add
r x (in + out) each (lora_A is r x in, lora_B is out x r; LoNAS traced both as NNCF Linear nodes, so its MACs
included them). The cost takes the module shapes of the model and an explicit active shape per module, so
elastic base widths (an MLP intermediate cut, fewer heads) only have to say which (in, out) a module has in
the subnet: `SubnetShape.base` overrides the full shape module by module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..rank_layer import RankLoraLinear


@dataclass(frozen=True)
class LinearShape:
    in_features: int
    out_features: int


@dataclass(frozen=True)
class SubnetShape:
    """What is active in a subnet: adapter rank per adapted module, and base (in, out) where it is not the
    full one (empty while only adapter ranks are elastic)."""

    ranks: dict[str, int]
    base: dict[str, LinearShape] = field(default_factory=dict)


@dataclass(frozen=True)
class Cost:
    base_params: int      # the NNCF way: base Linear weights only
    base_macs: int        # per token
    adapter_params: int   # active ranks x (in + out)
    adapter_macs: int     # per token

    @property
    def params(self) -> int:
        return self.base_params + self.adapter_params

    @property
    def macs(self) -> int:
        return self.base_macs + self.adapter_macs

    def as_dict(self) -> dict[str, int]:
        return {"params": self.params, "macs": self.macs, "base_params": self.base_params,
                "base_macs": self.base_macs, "adapter_params": self.adapter_params, "adapter_macs": self.adapter_macs}


def linear_shapes(model: torch.nn.Module) -> tuple[dict[str, LinearShape], dict[str, LinearShape]]:
    """(base Linear layers, adapted modules) of a peft model, each name -> full (in, out). An adapted module's
    base weight is counted under the adapted module's name (not `.base_layer`), the name the search space uses;
    its lora_A / lora_B Linears are adapter cost, not base cost."""
    base: dict[str, LinearShape] = {}
    adapted: dict[str, LinearShape] = {}
    inside_adapter: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, RankLoraLinear):
            adapted[name] = LinearShape(module.in_features, module.out_features)
            base[name] = adapted[name]
            inside_adapter.add(name + ".")
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or any(name.startswith(p) for p in inside_adapter):
            continue  # the adapted module's base_layer and its lora_A / lora_B
        base[name] = LinearShape(module.in_features, module.out_features)
    return base, adapted


class CostModel:
    """The cost of any subnet of one model, from the model's module shapes (read once)."""

    def __init__(self, base: dict[str, LinearShape], adapted: dict[str, LinearShape]):
        self.base, self.adapted = dict(base), dict(adapted)

    @classmethod
    def of(cls, model: torch.nn.Module) -> "CostModel":
        return cls(*linear_shapes(model))

    def cost(self, subnet: SubnetShape) -> Cost:
        unknown = sorted(set(subnet.ranks) - set(self.adapted)) + sorted(set(subnet.base) - set(self.base))
        if unknown:
            raise KeyError(f"modules not in the model: {unknown[:3]}")
        shapes = {**self.base, **subnet.base}
        base = sum(s.in_features * s.out_features for s in shapes.values())
        # A rank multiplies the module's active (in, out): a narrower base also narrows its adapter.
        adapter = sum(r * (shapes[m].in_features + shapes[m].out_features) for m, r in subnet.ranks.items())
        # One token passes each weight once: MACs per token equal the weights of the layers it passes.
        return Cost(base_params=base, base_macs=base, adapter_params=adapter, adapter_macs=adapter)
