"""Parameters and multiply-accumulates per token of an active subnet.

NNCF BootstrapNAS counts, over Linear layers, params = in x out and MACs = in x out per token. Here the base
model's Linear layers (including the output head) are counted that way, and every adapted module adds its active
rank x (active in + active out) (lora_A is r x in, lora_B is out x r; LoNAS traced both as NNCF Linear nodes, so
its counts include them). A module in no search-space group keeps its full rank, but its (in, out) still follows
the base widths that feed it: LoNAS's LLaMA-7B config leaves down_proj's LoRA out of every group, and NNCF still
cuts its lora_A input columns with the MLP width. The cost takes the module shapes of the model and an explicit
active shape per module, so elastic base widths (an MLP intermediate cut, fewer heads) only have to say which
(in, out) a module has in the subnet: `SubnetShape.base` overrides the full shape module by module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..adapters.rank_layer import RankLoraLinear
from .base_shape import BaseWidths, layer_index


@dataclass(frozen=True)
class LinearShape:
    in_features: int
    out_features: int


@dataclass(frozen=True)
class SubnetShape:
    """What is active in a subnet: adapter rank per adapted module, and base (in, out) where it is not the
    full one (empty while only adapter ranks are elastic)."""

    ranks: dict[str, int]  # adapted modules absent here count at their full rank
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


def _full_rank(module: RankLoraLinear) -> int:
    active = getattr(module, "active_adapters", None) or list(module.r)
    return int(module.r[active[0]])


def linear_shapes(model: torch.nn.Module) -> tuple[dict[str, LinearShape], dict[str, LinearShape], dict[str, int]]:
    """(base Linear layers, adapted modules, adapted modules' full ranks) of a peft model, each name -> full
    (in, out) or r. An adapted module's base weight is counted under the adapted module's name (not
    `.base_layer`), the name the search space uses; its lora_A / lora_B Linears are adapter cost, not base cost.
    A head peft copies for training (`modules_to_save`) is counted once: one of the two copies runs."""
    base: dict[str, LinearShape] = {}
    adapted: dict[str, LinearShape] = {}
    ranks: dict[str, int] = {}
    skipped: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, RankLoraLinear):
            adapted[name] = LinearShape(module.in_features, module.out_features)
            ranks[name] = _full_rank(module)
            base[name] = adapted[name]
            skipped.add(name)  # its base_layer and its lora_A / lora_B
        elif hasattr(module, "original_module") and hasattr(module, "modules_to_save"):
            skipped.add(name + ".original_module")  # the frozen original of a trained copy
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or any(name.startswith(p + ".") or name == p for p in skipped):
            continue
        base[name] = LinearShape(module.in_features, module.out_features)
    return base, adapted, ranks


class CostModel:
    """The cost of any subnet of one model, from the model's module shapes (read once)."""

    def __init__(self, base: dict[str, LinearShape], adapted: dict[str, LinearShape], ranks: dict[str, int],
                 head_dim: int | None = None):
        self.base, self.adapted, self.ranks = dict(base), dict(adapted), dict(ranks)
        missing = sorted(set(self.adapted) - set(self.ranks))
        if missing:
            raise KeyError(f"adapted modules without a full rank: {missing[:3]}")
        self.head_dim = head_dim  # for a query cut under grouped-query attention (kv_width)

    @classmethod
    def of(cls, model: torch.nn.Module) -> "CostModel":
        return cls(*linear_shapes(model), head_dim=head_dim_of(model))

    def cost(self, subnet: SubnetShape) -> Cost:
        unknown = sorted(set(subnet.ranks) - set(self.adapted)) + sorted(set(subnet.base) - set(self.base))
        if unknown:
            raise KeyError(f"modules not in the model: {unknown[:3]}")
        shapes = {**self.base, **subnet.base}
        base = sum(s.in_features * s.out_features for s in shapes.values())
        # Every adapted module counts: its active rank, or its full rank when the subnet does not set one (a module
        # in no group). A rank multiplies the module's active (in, out): a narrower base also narrows its adapter.
        ranks = {**self.ranks, **subnet.ranks}
        adapter = sum(r * (shapes[m].in_features + shapes[m].out_features) for m, r in ranks.items())
        # One token passes each weight once: MACs per token equal the weights of the layers it passes.
        return Cost(base_params=base, base_macs=base, adapter_params=adapter, adapter_macs=adapter)


# --- elastic base widths (LoNAS): which modules a layer's cut narrows, and how -------------------------------
# Name suffixes of the base Linear layers a cut narrows: Llama-style, BERT and BLOOM names. An MLP cut keeps the
# first w intermediate channels (gate/up outputs, down inputs); an attention cut keeps the first c query
# channels in whole heads (q/k/v outputs, the output projection's inputs).
MLP_OUT = ("mlp.gate_proj", "mlp.up_proj", "intermediate.dense", "mlp.dense_h_to_4h")
MLP_IN = ("mlp.down_proj", "mlp.dense_4h_to_h")
ATTN_QUERY = ("self_attn.q_proj", "attention.self.query")
ATTN_KV = ("self_attn.k_proj", "self_attn.v_proj", "attention.self.key", "attention.self.value")
ATTN_IN = ("self_attn.o_proj", "attention.output.dense")


def base_role(name: str) -> str | None:
    """mlp_out | mlp_in | query | kv | attn_in for a base module a width cut narrows, else None."""
    def ends(suffixes):
        return any(name == s or name.endswith("." + s) for s in suffixes)
    if ends(MLP_OUT):
        return "mlp_out"
    if ends(MLP_IN) or (name.endswith(".output.dense") and not ends(ATTN_IN)):  # BERT's layer.N.output.dense
        return "mlp_in"
    if ends(ATTN_QUERY):
        return "query"
    if ends(ATTN_KV):
        return "kv"
    if ends(ATTN_IN):
        return "attn_in"
    return None


def kv_width(query_width: int, query_full: int, kv_full: int, head_dim: int | None) -> int:
    """Key/value channels a query cut keeps: all heads when q and k/v are the same size (BERT, MHA); under
    grouped-query attention the key/value heads the first query heads read (query head i reads kv head i // g)."""
    if kv_full == query_full:
        return query_width
    group = query_full // kv_full
    if head_dim is None:  # shapes only: proportional, rounded up
        return min(kv_full, -(-query_width // group))
    heads = -(-query_width // head_dim)
    return min(kv_full, -(-heads // group) * head_dim)


def base_overrides(shapes: dict[str, LinearShape], widths: BaseWidths,
                   head_dim: int | None = None) -> dict[str, LinearShape]:
    """The (in, out) of every base module a BaseWidths ({layer: LayerWidths}) narrows, for SubnetShape.base."""
    if not widths:
        return {}
    by_layer: dict[int, dict[str, tuple[str, LinearShape]]] = {}
    for name, shape in shapes.items():
        role, layer = base_role(name), layer_index(name)
        if role is not None and layer in widths:
            by_layer.setdefault(layer, {})[name] = (role, shape)
    out: dict[str, LinearShape] = {}
    for layer, modules in by_layer.items():
        w, c = widths[layer].mlp, widths[layer].attention
        query_full = next((s.out_features for r, s in modules.values() if r == "query"), None)
        for name, (role, s) in modules.items():
            if w is not None and role == "mlp_out":
                out[name] = LinearShape(s.in_features, w)
            elif w is not None and role == "mlp_in":
                out[name] = LinearShape(w, s.out_features)
            elif c is not None and role == "query":
                out[name] = LinearShape(s.in_features, c)
            elif c is not None and role == "kv":
                out[name] = LinearShape(s.in_features, kv_width(c, query_full or s.out_features, s.out_features,
                                                                head_dim))
            elif c is not None and role == "attn_in":
                out[name] = LinearShape(c, s.out_features)
    return out


def head_dim_of(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "num_attention_heads", None):
        return None
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def subnet_cost(costs: CostModel, space, config: dict[str, int]) -> Cost:
    """The cost of a subnet config: its adapter ranks (space.module_widths; modules in no group at full rank), base
    widths (space.base_widths) and the inputs that follow them (space.dynamic_inputs).
    The one cost function of the search, the size report and the compact export's summary."""
    base = base_overrides(costs.base, space.base_widths(config), costs.head_dim)
    # Inputs an NNCF config declares dynamic (add_dynamic_inputs) follow their group's width, whatever the module
    # is called (the attention-output projection of LoNAS's BERT configs).
    for module, width in space.dynamic_input_widths(config).items():
        out = base.get(module, costs.base[module]).out_features
        base[module] = LinearShape(width, out)
    return costs.cost(SubnetShape(space.module_widths(config), base))


SUBNETS = ("maximal", "heuristic", "minimal")


def size_report(costs: CostModel, space) -> dict[str, dict[str, int]]:
    """Params and MACs per token (and their base / adapter parts) of the maximal, heuristic, minimal subnets."""
    return {which: subnet_cost(costs, space, getattr(space, which)()).as_dict() for which in SUBNETS}


def human(count: float) -> str:
    """3 significant digits with a K / M / B / T suffix: 6679000000 -> '6.68B', 135000000 -> '135M'."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"), (1, "")):
        value = float(f"{count / scale:.3g}")  # rounded first: 999_950 is '1M', not '1e+03K'
        if abs(value) >= 1 or scale == 1:
            return f"{value:g}{suffix}" if value < 1000 else f"{value:.0f}{suffix}"


def format_size_report(report: dict[str, dict[str, int]]) -> str:
    return "\n".join(f"{which}: params {human(r['params'])}, MACs/token {human(r['macs'])} "
                     f"(base {human(r['base_params'])}, adapter {human(r['adapter_params'])})"
                     for which, r in report.items())
