"""Importance-ordered base widths: before supernet training, permute each elastic base width's channels (MLP
intermediate channels; attention heads in whole key/value groups) so that the prefix an elastic width keeps
(base_masks.py, compact.py: always the first channels) is the most important part of the layer.

A permutation of a layer's channels (units) is applied to every weight it touches, so the model computes the same
function (the maximal subnet's logits are unchanged):
- MLP (Llama gate/up, BLOOM dense_h_to_4h, BERT intermediate.dense): output rows (+ bias, + lora_B rows) of the
  producers, input columns (+ lora_A columns) of the consumer (down_proj, dense_4h_to_h, output.dense);
- attention (Llama family q/k/v -> o_proj, BERT query/key/value -> attention.output.dense): whole key/value
  groups (a key/value head with the query heads that read it; one head without GQA) move together: q rows and
  o columns in blocks of group x head_dim, k/v rows in blocks of head_dim. Heads attend independently and RoPE acts
  within a head, so moving whole heads changes nothing. BLOOM attention is refused: ALiBi gives each head position
  its own slope, so moving heads changes the model.

Importance of a channel j (a unit sums its channels' squared scores):
- `activation` (Wanda's |W|·‖X‖ per channel, on the channel's contribution to the layer output as Minitron ranks
  neurons and heads by their activations): ‖x_j‖₂ over the calibration tokens (padding masked out) at the input of
  the consumer, times ‖W_consumer[:, j]‖₂ — exactly the L2 norm of channel j's contribution to the consumer's output
  over those tokens.
- `magnitude` (weights only, as BootstrapNAS's width reorganisation / Once-for-All's channel sorting): an upper
  bound of that contribution from the weights alone: MLP ‖W_p[j, :]‖₂ of every producer times ‖W_c[:, j]‖₂;
  attention ‖W_v‖_F of the group's value rows times ‖W_o‖_F of its output columns (softmax mixes values convexly).
Units are sorted by decreasing importance (stable: ties keep their order). The adapters' ranks are not reordered:
at initialisation lora_B = 0 and lora_A is i.i.d., so no rank carries more than another.

The permutation (one index tensor per layer and kind, over units) is saved with the run (`supernet/`) and applied
to the freshly loaded base before the adapter is loaded (eval, export, search), so the reloaded model is the
trained one; the plain adapter export is permuted back, so it applies to the stock base.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from .base_masks import BaseTarget, find_base_targets

METHODS = ("none", "activation", "magnitude")
ORDER_FILE = "base_order.safetensors"
KEY = "adapter.elastic.importance"

# consumer suffix -> (producer suffixes relative to the consumer's parent, the value projection among them)
_MLP_PRODUCERS = {"mlp.down_proj": (("mlp.gate_proj", "mlp.up_proj"), None),
                  "mlp.dense_4h_to_h": (("mlp.dense_h_to_4h",), None),
                  "output.dense": (("intermediate.dense",), None)}
_ATTENTION_PRODUCERS = {"self_attn.o_proj": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                             "self_attn.v_proj"),
                        "attention.output.dense": (("attention.self.query", "attention.self.key",
                                                    "attention.self.value"), "attention.self.value")}


def order_key(layer: int, kind: str) -> str:
    return f"L{layer}:{kind}"


class Touched:
    """The modules one unit permutation touches: producers (output rows) and the consumer (input columns)."""

    def __init__(self, model: nn.Module, target: BaseTarget):
        self.target = target
        modules = dict(model.named_modules())
        table = _MLP_PRODUCERS if target.kind == "mlp" else _ATTENTION_PRODUCERS
        for suffix, (producers, value) in table.items():
            if target.module.endswith("." + suffix):
                stem = target.module[: -len(suffix)]
                self.consumer = modules[target.module]
                self.producers = {p: modules[stem + p] for p in producers if stem + p in modules}
                self.value = modules.get(stem + value) if value else None
                if len(self.producers) != len(producers) or not self.producers:
                    break
                self.units = target.size // target.unit
                return
        why = ("BLOOM's ALiBi gives each head position its own slope, so heads cannot move"
               if target.module.endswith("self_attention.dense") else
               "the projections that feed it are not the Llama-family or BERT ones flexrank knows")
        raise ConfigError(KEY, "set", f"none for {target.module}", why)

    def tensors(self):
        """(tensor, dim) pairs, every weight the permutation touches: producers' rows, the consumer's columns."""
        for module in self.producers.values():
            base = getattr(module, "base_layer", module)
            yield base.weight, 0
            if getattr(base, "bias", None) is not None:
                yield base.bias, 0
            for lora_b in getattr(module, "lora_B", {}).values():
                yield lora_b.weight, 0
        base = getattr(self.consumer, "base_layer", self.consumer)
        yield base.weight, 1
        for lora_a in getattr(self.consumer, "lora_A", {}).values():
            yield lora_a.weight, 1


def _weight(module: nn.Module) -> torch.Tensor:
    return getattr(module, "base_layer", module).weight


def _unit_norms(matrix: torch.Tensor, dim: int, units: int) -> torch.Tensor:
    """Per unit: the Frobenius norm of its block of rows (dim 0) or columns (dim 1)."""
    sq = matrix.detach().float().pow(2).sum(dim=1 - dim)
    return sq.view(units, -1).sum(dim=1).sqrt()


def _refuse_unusable(model: nn.Module) -> None:
    for p in model.parameters():
        if hasattr(p, "ds_id"):
            raise ConfigError(KEY, "set", "none when DeepSpeed partitions the base as it loads (zero3_init_flag)",
                              "the permutation needs whole weights before the engine wraps the model: launch "
                              "ZeRO-3 without zero3_init_flag (each process then loads the whole base)")
        if not p.is_floating_point():
            raise ConfigError(KEY, "set", "none with a 4-bit (QLoRA) base",
                              "packed 4-bit weights cannot be permuted in place")


def magnitude_scores(touched: Touched) -> torch.Tensor:
    units, c = touched.units, _weight(touched.consumer)
    consumer = _unit_norms(c, 1, units)
    if touched.target.kind == "mlp":
        score = consumer
        for producer in touched.producers.values():
            score = score * _unit_norms(_weight(producer), 0, units)
        return score
    return consumer * _unit_norms(_weight(touched.value), 0, units)


def activation_scores(model: nn.Module, touched: list[Touched], batches: Iterable[dict]) -> list[torch.Tensor]:
    """Per touched layer: unit scores from the consumer's input over the calibration batches (padding masked)."""
    sums = [torch.zeros(t.target.size, dtype=torch.float64) for t in touched]
    state: dict = {}

    def hook(i):
        def record(module, args):
            x = args[0].detach().float()
            mask = state.get("mask")
            if mask is not None and mask.shape == x.shape[:-1]:
                x = x * mask.unsqueeze(-1).to(x.dtype)
            sums[i].add_(x.pow(2).reshape(-1, x.shape[-1]).sum(dim=0).double().cpu())
        return record

    handles = [t.consumer.register_forward_pre_hook(hook(i)) for i, t in enumerate(touched)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
                state["mask"] = batch.get("attention_mask")
                model(**batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    scores = []
    for t, s in zip(touched, sums):
        w = _weight(t.consumer).detach().float().norm(dim=0).double().cpu()
        channel = s.sqrt() * w  # ‖x_j‖ ‖W[:, j]‖: the norm of channel j's contribution to the output
        scores.append(channel.pow(2).view(t.units, -1).sum(dim=1).sqrt())
    return scores


def compute_order(model: nn.Module, targets: list[BaseTarget], method: str,
                  batches: Callable[[], Iterable[dict]] | None = None) -> dict[str, torch.Tensor]:
    """order_key -> unit permutation (most important first) for each target, measured on `model`."""
    if method not in METHODS[1:]:
        raise ConfigError(KEY, method, f"one of {METHODS[1:]} to order")
    _refuse_unusable(model)
    touched = [Touched(model, t) for t in targets]
    if method == "magnitude":
        scores = [magnitude_scores(t) for t in touched]
    else:
        scores = activation_scores(model, touched, batches())
    return {order_key(t.target.layer, t.target.kind): torch.argsort(-s, stable=True).to(torch.int64)
            for t, s in zip(touched, scores)}


def _index(perm: torch.Tensor, size: int) -> torch.Tensor:
    block = size // perm.numel()
    return (perm.unsqueeze(1) * block + torch.arange(block)).flatten()


def permute(tensor: torch.Tensor, dim: int, perm: torch.Tensor) -> None:
    """Reorder `tensor`'s blocks along `dim` in place (the same Parameter object): block i <- block perm[i]."""
    if tensor.shape[dim] % perm.numel():
        raise ValueError(f"dimension {tensor.shape[dim]} is not a multiple of {perm.numel()} units")
    index = _index(perm, tensor.shape[dim]).to(tensor.device)
    with torch.no_grad():
        tensor.copy_(tensor.index_select(dim, index))


def apply_order(model: nn.Module, order: dict[str, torch.Tensor]) -> int:
    """Permute every weight each order touches (base, biases, any LoRA B rows / A columns); returns how many
    units moved. An order for a layer or kind the model does not have is refused."""
    _refuse_unusable(model)
    targets = {order_key(t.layer, t.kind): t for t in find_base_targets(model).values()}
    moved = 0
    for key, perm in order.items():
        if key not in targets:
            raise ConfigError(KEY, key, f"a base width of this model ({', '.join(sorted(targets)) or 'none'})",
                              "the saved order does not fit the model it is applied to")
        touched = Touched(model, targets[key])
        if perm.numel() != touched.units or not torch.equal(perm.sort().values, torch.arange(perm.numel())):
            raise ConfigError(KEY, key, f"a permutation of {touched.units} units")
        for tensor, dim in touched.tensors():
            permute(tensor, dim, perm)
        moved += int((perm != torch.arange(perm.numel())).sum())
    return moved


def inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), dtype=perm.dtype)
    return inv


def unpermute_adapter_state(state: dict[str, torch.Tensor], model: nn.Module,
                            order: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain peft adapter state of the permuted model (peft's saved keys, `...q_proj.lora_B.weight`) mapped
    back to the stock base's channel order: producers' lora_B rows and the consumer's lora_A columns."""
    targets = {order_key(t.layer, t.kind): t for t in find_base_targets(model).values()}
    names = {module: name for name, module in model.named_modules()}
    out = dict(state)
    for key, perm in order.items():
        touched, inv = Touched(model, targets[key]), inverse(perm)
        parts = [(names[m], "lora_B", 0) for m in touched.producers.values()] + \
                [(names[touched.consumer], "lora_A", 1)]
        for module, part, dim in parts:
            for k in [k for k in out if k.startswith(module + f".{part}.") and k.endswith("weight")]:
                out[k] = out[k].index_select(dim, _index(inv, out[k].shape[dim]))
    return out


def save_order(folder: Path, order: dict[str, torch.Tensor], method: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in order.items()}, Path(folder) / ORDER_FILE,
              metadata={"importance": method})


def load_order(folder: Path) -> dict[str, torch.Tensor] | None:
    path = Path(folder) / ORDER_FILE
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    return load_file(path)


def broadcast_order(order: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The main process's order on every process (they measure the same data, but ties and reduction order
    must not make processes disagree)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return order
    keys = sorted(order)
    flat = torch.cat([order[k] for k in keys])
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else flat.device
    flat = flat.to(device)
    dist.broadcast(flat, src=0)
    out, start = {}, 0
    for k in keys:
        n = order[k].numel()
        out[k] = flat[start:start + n].cpu()
        start += n
    return out
