"""Sparse base models for Shears: Wanda pruning, and a LoRA merge that keeps the base's zeros (SQFT SparsePEFT)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..errors import ConfigError

ModuleFilter = Callable[[str, nn.Module], bool]


def _targets(model: nn.Module, module_filter: ModuleFilter | None) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear modules to prune/measure: by default all but the LM head and peft adapter matrices."""
    if module_filter is None:
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None

        def module_filter(name, module):
            # The head is tied to the embeddings in many models; lora_A/lora_B are adapters, not base weights.
            return module is not head and not name.endswith("lm_head") and not any(
                part.startswith("lora_") for part in name.split("."))

    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and module_filter(n, m)]
    if not targets:
        raise ConfigError("sparsity.modules", 0, "at least one nn.Linear selected for pruning")
    return targets


def wanda_prune(model: nn.Module, batches: Iterable[dict], ratio: float,
                module_filter: ModuleFilter | None = None) -> dict:
    """Wanda (Sun et al. 2023): score |W_ij|·‖X_j‖₂ over all calibration tokens, and zero the
    `int(in_features * ratio)` lowest scores of every output row. Statistics come from one pass over
    the unpruned model. Calibration batches should be unpadded (pad tokens would count as tokens)."""
    if not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 <= ratio < 1):
        raise ConfigError("sparsity.ratio", ratio, "a number in [0, 1)")
    targets = _targets(model, module_filter)
    sq_norms: dict[str, torch.Tensor] = {}

    def collector(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, module.in_features).float()
            total = x.pow(2).sum(0)  # fp32: sums of squares over many tokens overflow fp16/bf16
            sq_norms[name] = sq_norms[name] + total if name in sq_norms else total
        return hook

    device = next(model.parameters()).device
    was_training = model.training
    handles = [m.register_forward_pre_hook(collector(n)) for n, m in targets]
    try:
        model.eval()  # dropout would distort the activation statistics
        with torch.no_grad():
            for batch in batches:
                model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    missing = [n for n, _ in targets if n not in sq_norms]
    if missing:
        raise ConfigError("sparsity.calibration", missing[:3], "calibration batches whose forward pass reaches "
                          "every pruned module", hint="pass module_filter to leave out modules they never reach")

    per_module, zeros, total = {}, 0, 0
    with torch.no_grad():
        for name, module in targets:
            weight = module.weight
            k = int(module.in_features * ratio)
            if k:
                score = weight.float().abs() * sq_norms[name].to(weight.device).sqrt()
                # Per output row, as Wanda does; stable so ties break the same way on every run.
                lowest = torch.sort(score, dim=1, stable=True).indices[:, :k]
                weight.scatter_(1, lowest, 0)
            n_zero = int((weight == 0).sum())
            per_module[name] = n_zero / weight.numel()
            zeros, total = zeros + n_zero, total + weight.numel()
    return {"ratio_target": ratio, "ratio_achieved": zeros / total, "modules": len(targets), "per_module": per_module}


def sparsity_of(model: nn.Module, module_filter: ModuleFilter | None = None) -> float:
    """Fraction of zero weights over the modules wanda_prune would prune."""
    counts = [(int((m.weight == 0).sum()), m.weight.numel()) for _, m in _targets(model, module_filter)]
    return sum(z for z, _ in counts) / sum(n for _, n in counts)


def sparse_merge(peft_model: nn.Module, adapter_name: str = "default") -> nn.Module:
    """Merge a LoRA adapter into its sparse base as W += ΔW ⊙ (W != 0), so the merged model keeps the
    base's sparsity (SQFT SparsePEFT), then drop the adapters. Returns the plain base model."""
    from peft.tuners.lora import LoraLayer  # peft is only needed here

    from .rank_layer import RankLoraLinear

    layers = [(n, m) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)
              and any(adapter_name in getattr(m, attr) for attr in m.adapter_layer_names)]
    if not layers:
        raise ConfigError("adapter_name", adapter_name, "the name of a LoRA adapter in this model")
    # Check every layer before touching any weight, so a refusal leaves the model as it was.
    for name, layer in layers:
        if adapter_name in layer.merged_adapters:
            raise ConfigError("adapter_name", adapter_name, "an adapter that is not merged yet", hint=name)
        # flexrank's rank layer is a variant whose get_delta_weight is the exact linear ΔW (B·diag(g⊙m)·A·s).
        linear_delta = adapter_name not in layer.lora_variant or isinstance(layer, RankLoraLinear)
        if not linear_delta or layer.lora_bias.get(adapter_name):
            raise ConfigError("adapter_name", adapter_name,
                              "a LoRA or flexrank rank adapter (no DoRA/other variant, no lora_bias)",
                              hint=f"{name}: the masked ΔW merge is defined for a linear ΔW only")
        weight = getattr(layer.get_base_layer(), "weight", None)
        if not (torch.is_tensor(weight) and weight.is_floating_point()):
            raise ConfigError("sparse_merge", name, "a LoRA layer over an unquantized floating-point weight",
                              hint="a packed quantized weight has no meaningful zero pattern")
    with torch.no_grad():
        for _, layer in layers:
            weight = layer.get_base_layer().weight
            delta = layer.get_delta_weight(adapter_name).to(weight.dtype)
            weight.add_(delta * (weight != 0))
    return peft_model.unload()
