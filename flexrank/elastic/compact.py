"""Compact export of an elastic subnet: a physically smaller Hugging Face model that stock transformers (+ peft)
loads, with the logits the supernet gives for that subnet (LoNAS itself never wrote one).

The base weights are sliced to the subnet's base widths (first channels, as LoNAS cuts them): the MLP's
gate/up output rows and down input columns; q/k/v output rows and the attention output projection's input
columns in whole heads (under grouped-query attention, the key/value heads the kept query heads read). The
adapter keeps only the subnet's active ranks (export.plain_lora_state) and is merged into the weights (default)
or written as a plain peft adapter sliced the same way.

A transformers config has one `intermediate_size` and one head count for all layers (Llama's MLP reads an int;
a list does not load). Where widths differ per layer, the model takes the largest and the narrower layers are
padded with zero down_proj columns / zero output-projection columns: a zero column drops that channel's
contribution exactly, so the logits are the subnet's, and only the padded channels cost memory. Encoder configs
without `head_dim` (BERT) derive the head size from hidden_size / heads, so their head count cannot shrink:
dropped heads are zero columns there.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from ..adapters.export import _PEFT_PREFIX, _plain_config, plain_lora_state, save_export
from ..adapters.rank_layer import rank_layers
from .base_shape import BaseWidths, layer_index
from .cost import base_role


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class Plan:
    """The compact model's sizes, and per (layer, role) how many channels to keep and which to zero."""

    def __init__(self, config, widths: BaseWidths):
        self.config = config
        inter = getattr(config, "intermediate_size", None)
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layers = range(config.num_hidden_layers)
        outside = sorted(set(widths) - set(layers))
        if outside:
            raise ConfigError("base widths", f"layer {outside[0]}", f"layers 0..{config.num_hidden_layers - 1}")
        mlp = {i: widths[i].mlp if i in widths and widths[i].mlp is not None else inter for i in layers}
        for i, w in mlp.items():
            if inter is None and w is not None:
                raise ConfigError(f"base width of layer {i} (mlp)", w, "none: the config has no intermediate_size")
            if inter is not None and not 0 < w <= inter:
                raise ConfigError(f"base width of layer {i} (mlp)", w, f"1..{inter} (the model's intermediate_size)")
        attention = {}
        for i in layers:
            c = widths[i].attention if i in widths and widths[i].attention is not None else heads * self.head_dim
            if not (0 < c <= heads * self.head_dim and c % self.head_dim == 0):
                raise ConfigError(f"base width of layer {i} (attention)", c,
                                  f"whole heads: a multiple of {self.head_dim} up to {heads * self.head_dim}")
            attention[i] = c // self.head_dim
        self.mlp_width, self.layer_heads = mlp, attention
        self.intermediate_size = inter and max(mlp.values())
        group = heads // kv_heads
        # A head count only shrinks where the config states the head size (Llama-style head_dim); BERT keeps all.
        can_shrink = "head_dim" in config.to_dict()
        self.heads = _ceil_div(max(attention.values()), group) * group if can_shrink else heads
        self.kv_heads = self.heads // group

    def keep(self, role: str) -> int:
        return {"mlp_out": self.intermediate_size, "mlp_in": self.intermediate_size,
                "query": self.heads * self.head_dim, "kv": self.kv_heads * self.head_dim,
                "attn_in": self.heads * self.head_dim}[role]

    def active(self, layer: int, role: str) -> int:
        """Input channels that carry the subnet's signal (the rest of `keep` are zero-padded)."""
        return self.mlp_width[layer] if role == "mlp_in" else self.layer_heads[layer] * self.head_dim

    def new_config(self):
        config = self.config.__class__.from_dict(self.config.to_dict())
        if getattr(config, "intermediate_size", None) is not None:
            config.intermediate_size = self.intermediate_size
        if "head_dim" in config.to_dict():
            config.num_attention_heads, config.head_dim = self.heads, self.head_dim
            if hasattr(config, "num_key_value_heads"):
                config.num_key_value_heads = self.kv_heads
        return config


def _slice(tensor: torch.Tensor, role: str, plan: Plan, layer: int, is_weight: bool, lora: str | None = None):
    """Cut one tensor of a narrowed module. lora: None for the base, 'A' / 'B' for the adapter's matrices."""
    keep = plan.keep(role)
    if keep is None:  # an MLP without intermediate_size in its config (BLOOM's 4 x hidden): never cut
        return tensor
    if role in ("mlp_in", "attn_in"):
        if lora == "B" or not is_weight:  # output side (bias, lora_B rows) is not cut
            return tensor
        tensor = tensor[:, :keep].clone()
        tensor[:, plan.active(layer, role):] = 0  # padding to the model-wide width: zero columns drop it exactly
        return tensor
    if lora == "A":  # input side of an output cut: lora_A is r x in, unchanged
        return tensor
    return tensor[:keep].clone()


def _narrowed(name: str) -> tuple[str, int] | None:
    role, layer = base_role(name), layer_index(name)
    return (role, layer) if role is not None and layer is not None else None


def compact_model_state(peft_model, adapter: str = "default", merge: bool = True):
    """(base state dict with clean names, plain adapter state, rank_pattern, alpha_pattern) of the active
    subnet's ranks; with merge the adapter is added to the base weights (and the adapter state is empty)."""
    if not rank_layers(peft_model) or peft_model.peft_config[adapter].fan_in_fan_out:
        raise ConfigError("--compact", type(peft_model.get_base_model()).__name__,
                          "a run on flexrank's rank layer (elastic, sora, adalora) over nn.Linear weights")
    lora, ranks, alphas = plain_lora_state(peft_model, adapter)
    base = {}
    for key, value in peft_model.get_base_model().state_dict().items():
        if ".lora_" in key:
            continue
        if key.endswith(".weight") and not value.is_floating_point():
            raise ConfigError("--compact", key, "a full-precision base (a 4-bit QLoRA base cannot be sliced)")
        base[key.replace(".base_layer.", ".")] = value.detach().cpu()
    if not merge:
        return base, lora, ranks, alphas
    for key, r in ranks.items():
        a = lora[f"{_PEFT_PREFIX}{key}.lora_A.weight"].float()
        b = lora[f"{_PEFT_PREFIX}{key}.lora_B.weight"].float()
        weight = base[f"{key}.weight"]
        base[f"{key}.weight"] = (weight.float() + (b @ a) * (alphas[key] / r)).to(weight.dtype)
    return base, {}, ranks, alphas


def compact(peft_model, widths: BaseWidths, adapter: str = "default", merge: bool = True):
    """(new config, sliced base state, sliced adapter state, rank_pattern, alpha_pattern, plan)."""
    config = peft_model.get_base_model().config
    plan = Plan(config, widths)
    base, lora, ranks, alphas = compact_model_state(peft_model, adapter, merge)
    sliced = {}
    for key, value in base.items():
        module, suffix = key.rsplit(".", 1)
        where = _narrowed(module)
        sliced[key] = _slice(value, where[0], plan, where[1], suffix == "weight") if where else value
    sliced_lora = {}
    for key, value in lora.items():
        module, part = key.rsplit(".", 2)[0], key.rsplit(".", 2)[1]  # ...q_proj, lora_A
        where = _narrowed(module.removeprefix(_PEFT_PREFIX))
        sliced_lora[key] = _slice(value, where[0], plan, where[1], True, part[-1]) if where else value
    return plan.new_config(), sliced, sliced_lora, ranks, alphas, plan


def export_compact(peft_model, widths: BaseWidths, out: str | Path, merge: bool = True, tokenizer=None,
                   adapter: str = "default") -> dict:
    """Write the compact model to `out` (atomically; refuses a folder that is not a previous export): config.json
    + safetensors (+ tokenizer), and unless merged a plain peft adapter in out/adapter."""
    from accelerate import init_empty_weights

    config, state, lora, ranks, alphas, plan = compact(peft_model, widths, adapter, merge)
    base_cls = type(peft_model.get_base_model())
    with init_empty_weights():
        model = base_cls(config)
    model.load_state_dict(state, strict=True, assign=True)  # every tensor sliced to the new config's shapes
    model.tie_weights()
    summary = {"intermediate_size": plan.intermediate_size, "num_attention_heads": plan.heads,
               "num_key_value_heads": plan.kv_heads, "merged": merge,
               "layer_widths": {i: {"mlp": plan.mlp_width[i], "heads": plan.layer_heads[i]}
                                for i in plan.mlp_width},
               "params": int(sum(p.numel() for p in model.parameters())),
               "adapter_params": int(sum(v.numel() for v in lora.values())), "rank_pattern": ranks}
    src = peft_model.peft_config[adapter]

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        if lora:
            from safetensors.torch import save_file

            (folder / "adapter").mkdir()
            plain = _plain_config(src, ranks, alphas)
            plain.base_model_name_or_path = None
            plain.save_pretrained(folder / "adapter")
            save_file({k: v.contiguous() for k, v in lora.items()}, folder / "adapter" / "adapter_model.safetensors",
                      metadata={"format": "pt"})

    save_export(out, write, summary, key="--compact")
    return summary
