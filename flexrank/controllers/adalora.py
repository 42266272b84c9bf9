"""AdaLoRA (Zhang et al. 2023) budget scheduling on the rank layer: ΔW = B · diag(E ⊙ m) · A · s.

E is the learned gate (AdaLoRA's Λ, initialised to zero, with A and B random). Importance is computed from the
real gradients of each optimizer step, once they are final (accumulated, averaged over processes, gathered from
ZeRO partitions or FSDP2 shards): per element ipt = |p · ∇p|, its EMA (β1) and the EMA of its uncertainty
|ipt − EMA| (β2); a triplet's score is s(E_i) + mean_j s(A_ij) + mean_k s(B_ki). A cubic schedule takes the
budget from the initial total rank to target_r per module between tinit and total_step − tfinal, re-masking every
deltaT steps; after that the mask stays fixed. The controller only writes the mask buffers, identically on every
process; it never edits a parameter (peft zeroes E in place, which an optimizer's master copy undoes under ZeRO).
The orthogonal regulariser acts through the rank layer's backward (rank_layer._OrthogonalityGradient), or, once
FlexTrainer asks for the controller's extra loss and A and B are whole tensors on one device (one process, DDP,
ZeRO-1/2), through one batched term for all layers (rank_layer.BatchedOrthogonalityGradient).
"""

import torch

from ..distributed.backends import full_values_and_grads
from ..adapters.rank_layer import BatchedOrthogonalityGradient, RankLoraLinear, set_masks
from .base import RankController, host_sum


def budget_at(step: int, init_budget: int, target_budget: int, tinit: int, tfinal: int, total_step: int,
              delta_t: int) -> tuple[int, bool]:
    """(budget, whether to re-mask at this step): AdaLoRA's cubic schedule, as in peft's RankAllocator."""
    if step <= tinit:
        return init_budget, False
    if step > total_step - tfinal:
        return target_budget, True
    progress = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_budget - target_budget) * progress ** 3 + target_budget), step % delta_t == 0


class AdaLoRAController(RankController):
    def __init__(self, layers: dict[str, RankLoraLinear], target_r: int, total_step: int, tinit: int = 0,
                 tfinal: int = 0, delta_t: int = 1, beta1: float = 0.85, beta2: float = 0.85,
                 orth_reg_weight: float = 0.5, gradient_accumulation_steps: int = 1, adapter: str = "default"):
        super().__init__(layers, adapter)
        self.target_r, self.total_step, self.tinit, self.tfinal, self.delta_t = target_r, total_step, tinit, tfinal, delta_t
        self.beta1, self.beta2 = beta1, beta2
        self.init_budget = sum(layer.r[adapter] for layer in layers.values())
        self.target_budget = target_r * len(layers)
        self.step, self.budget = 0, self.init_budget
        # Per parameter ("<module>:A|B|E"): views into two flat tensors that one update rewrites in a few operators.
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}
        self._flat: tuple[list[str], torch.Tensor, torch.Tensor] | None = None  # (keys, ipt EMA, uncertainty EMA)
        self._groups: list[tuple[list[str], int, int, int]] | None = None  # see _shape_groups
        self._to_module_order: torch.Tensor | None = None  # triplet scores: shape-group order -> module order
        self.final = False  # the mask is fixed once the budget reaches its target
        # peft: orth_reg_weight · mean over all A and B matrices, added once per optimizer step.
        weight = orth_reg_weight / (2 * len(layers)) / gradient_accumulation_steps
        self.orthogonality_weight = weight
        self._batched_orthogonality: list[list[str]] | bool | None = None  # see extra_loss
        for layer in layers.values():
            layer.lora_gate[adapter].requires_grad_(True)
            layer.orthogonality_weight = weight

    def _shape_groups(self) -> list[tuple[list[str], int, int, int]]:
        """The modules grouped by shape, (names, r, in, out), in order of first appearance: a transformer has a
        handful of shapes (q/o, k/v, gate/up, down), so per-module work becomes per-group work."""
        if self._groups is None:
            groups: dict[tuple[int, int, int], list[str]] = {}
            for name, layer in self.layers.items():
                groups.setdefault((layer.r[self.adapter], layer.in_features, layer.out_features), []).append(name)
            self._groups = [(names, *shape) for shape, names in groups.items()]
            self._key_list = [f"{n}:{part}" for names, *_ in self._groups for part in "ABE" for n in names]
        return self._groups

    def _keys(self) -> list[str]:
        """"<module>:A|B|E" in the flat EMAs' order: per shape group, every module's A, then every B, then every E,
        so that each group's A (B, E) importances are one (modules, r, in) ((modules, out, r), (modules, r)) view
        of the flat tensor."""
        self._shape_groups()
        return self._key_list

    def _params(self) -> list[tuple[str, torch.Tensor]]:
        """(key, parameter) in the order of _keys."""
        tensors = {"A": lambda layer: layer.lora_A[self.adapter].weight,
                   "B": lambda layer: layer.lora_B[self.adapter].weight,
                   "E": lambda layer: layer.lora_gate[self.adapter]}
        return [(key, tensors[key[-1]](self.layers[key[:-2]])) for key in self._keys()]

    def before_pass(self, step: int, pass_index: int) -> None:
        self.step = step

    def extra_loss(self) -> torch.Tensor | None:
        """The orthogonal regulariser for all layers at once: a zero whose backward adds the regulariser's gradient
        to every A and B, batched per group of same-shaped layers (BatchedOrthogonalityGradient), where A and B are
        whole tensors on one device (one process, DDP, ZeRO-1/2). The first call in training decides: there, the
        layers' own regulariser is switched off from the next pass on (this pass's forward has applied it already)
        and None is returned. Under ZeRO-3 and FSDP2, where A and B are sharded outside the layers' forward, the
        layers keep it, as does a loop that never asks for the extra loss."""
        if not torch.is_grad_enabled() or self.orthogonality_weight == 0:
            return None
        if self._batched_orthogonality is None:
            self._batched_orthogonality = self._orthogonality_groups() or False
            if self._batched_orthogonality:
                for layer in self.layers.values():
                    layer.orthogonality_weight = 0.0
            return None
        if not self._batched_orthogonality:
            return None
        params, counts = [], []
        for names in self._batched_orthogonality:
            params += [self.layers[n].lora_A[self.adapter].weight for n in names]
            params += [self.layers[n].lora_B[self.adapter].weight for n in names]
            counts.append(len(names))
        return BatchedOrthogonalityGradient.apply(self.orthogonality_weight, self, counts, *params)

    def _orthogonality_groups(self) -> list[list[str]]:
        """Module names grouped by (r, in, out, dtypes) when every A and B is a whole tensor on one device, else []."""
        groups: dict[tuple, list[str]] = {}
        devices = set()
        for name, layer in self.layers.items():
            a, b = layer.lora_A[self.adapter].weight, layer.lora_B[self.adapter].weight
            if any(hasattr(p, "ds_id") or hasattr(p, "to_local") or not p.requires_grad for p in (a, b)):
                return []  # ZeRO-3 partition or FSDP2 DTensor: the layer's own backward has it whole
            devices |= {a.device, b.device}
            groups.setdefault((*a.shape, b.shape[0], a.dtype, b.dtype), []).append(name)
        return list(groups.values()) if len(devices) == 1 else []

    @torch.no_grad()
    def on_final_gradients(self) -> None:
        """Importance from this step's gradients, then the mask for the budget of this step. Which of them runs is
        decided by the schedule (a function of the step, the same on every process), never by reading a tensor:
        the masks are written at re-masking steps only, and nothing here waits for the device."""
        if self.final:
            return
        if self.step < self.total_step - self.tfinal:
            named = self._params()
            full = full_values_and_grads([p for _, p in named])  # collective: every process, same order
            self._update_importance([key for key, _ in named], full)
        self.budget, mask_now = budget_at(self.step, self.init_budget, self.target_budget, self.tinit, self.tfinal,
                                          self.total_step, self.delta_t)
        if mask_now and self.exp_avg_ipt:
            self._mask_to_budget(self.budget)
            self.final = self.step > self.total_step - self.tfinal

    def _update_importance(self, keys: list[str], full: list[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        """peft's RankAllocator.update_ipt, in the same operators (so the same roundings), on all parameters at once:
        concatenated, a handful of operators per step instead of a dozen per tensor. A parameter without a
        gradient in this step counts as importance 0 (peft has no such case: it would fail on it)."""
        # Cast after concatenating (one operator, not one per tensor): widening to float32 is exact either way.
        values = torch.cat([v.reshape(-1) for v, _ in full]).float()
        grads = torch.cat([(torch.zeros_like(v) if g is None else g).reshape(-1) for v, g in full]).float()
        ipt = values.mul_(grads).abs_()
        if self._flat is None or self._flat[0] != keys:  # first update, or after load_state_dict
            self._flat = (keys, *(self._flatten(ema, keys, full, ipt) for ema in (self.exp_avg_ipt, self.exp_avg_unc)))
            sizes = [v.numel() for v, _ in full]
            for ema, flat in zip((self.exp_avg_ipt, self.exp_avg_unc), self._flat[1:]):  # views, updated in place
                ema.update(zip(keys, (part.view_as(v) for part, (v, _) in zip(flat.split(sizes), full))))
        _, avg, unc = self._flat
        avg.mul_(self.beta1).add_(ipt * (1 - self.beta1))  # avg ← β1·avg + (1 − β1)·ipt
        unc.mul_(self.beta2).add_((ipt - avg).abs_().mul_(1 - self.beta2))  # unc ← β2·unc + (1 − β2)·|ipt − avg|

    @staticmethod
    def _flatten(ema: dict[str, torch.Tensor], keys: list[str], full, like: torch.Tensor) -> torch.Tensor:
        """One flat EMA from per-parameter ones (zeros where a parameter has none yet), on the gradients' device."""
        return torch.cat([ema[k].reshape(-1).to(like) if k in ema else like.new_zeros(v.numel())
                          for k, (v, _) in zip(keys, full)])

    def _triplet_scores(self) -> torch.Tensor:
        """Every triplet's score s(E_i) + mean_j s(A_ij) + mean_k s(B_ki), s = ipt EMA · uncertainty EMA, as one
        vector in module order (the modules of self.layers, r each): the same operators as per module, applied
        to a (modules, ...) view per shape group."""
        keys = self._keys()
        if self._flat is not None and self._flat[0] == keys:
            _, avg, unc = self._flat
        else:  # EMAs loaded from a checkpoint and not updated since (a resume after the last importance update)
            avg, unc = (torch.cat([ema[k].reshape(-1) for k in keys]) for ema in (self.exp_avg_ipt, self.exp_avg_unc))
        score = avg * unc
        parts, offset = [], 0
        for names, r, n_in, n_out in self._shape_groups():
            n = len(names)
            a = score[offset:offset + n * r * n_in].view(n, r, n_in)
            offset += n * r * n_in
            b = score[offset:offset + n * n_out * r].view(n, n_out, r)
            offset += n * n_out * r
            e = score[offset:offset + n * r].view(n, r)
            offset += n * r
            parts.append((e + a.mean(dim=2) + b.mean(dim=1)).reshape(-1))
        flat = torch.cat(parts)
        if self._to_module_order is None or self._to_module_order.device != flat.device:
            start, where = 0, {}
            for names, r, *_ in self._shape_groups():
                for name in names:
                    where[name] = range(start, start + r)
                    start += r
            order = [i for name in self.layers for i in where[name]]
            self._to_module_order = torch.tensor(order, device=flat.device)  # once: the layout never changes
        return flat.index_select(0, self._to_module_order)

    def _mask_to_budget(self, budget: int) -> None:
        """Keep the `budget` best triplets (exactly that many): their indices by topk on the device, the masks
        from one scatter, written to every module in one foreach copy."""
        flat = self._triplet_scores()
        layers = list(self.layers.values())
        masks = [layer.lora_rank_mask[self.adapter] for layer in layers]
        dtype = masks[0].dtype if len({m.dtype for m in masks}) == 1 else flat.dtype
        keep = torch.zeros(flat.numel(), dtype=dtype, device=flat.device)
        keep.scatter_(0, torch.topk(flat, budget, sorted=False).indices, 1)
        set_masks(layers, keep.split([layer.r[self.adapter] for layer in layers]), self.adapter)

    def log_metrics(self) -> dict[str, float]:
        batched = getattr(self, "orthogonality_values", None) if self._batched_orthogonality else None
        # Tensors set in backward: the batched term's (one per layer), or each layer's own.
        orth = [batched.sum()] if batched is not None else [getattr(l, "orthogonality_value", 0.0)
                                                            for l in self.layers.values()]
        return {"adalora/budget": float(self.budget), "adalora/active_rank": float(self.active_rank()),
                "adalora/orthogonality": host_sum(orth) / max(len(self.layers), 1)}

    def state_dict(self) -> dict:
        return {"step": self.step, "budget": self.budget, "final": self.final,
                "exp_avg_ipt": _on_cpu(self.exp_avg_ipt), "exp_avg_unc": _on_cpu(self.exp_avg_unc),
                "masks": {n: l.lora_rank_mask[self.adapter].detach().cpu().clone() for n, l in self.layers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.budget, self.final = state["step"], state["budget"], state["final"]
        # Copies: the EMAs are updated in place; flattened onto the gradients' device at their next update.
        self.exp_avg_ipt, self.exp_avg_unc = _on_cpu(state["exp_avg_ipt"]), _on_cpu(state["exp_avg_unc"])
        self._flat = None
        for name, mask in state["masks"].items():
            self.layers[name].set_mask(mask, self.adapter)


def _on_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}
