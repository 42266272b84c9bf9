"""SoRA (Ding et al. 2023): a learned gate per rank, sparsified by a proximal step after every optimizer update.

The gates get their own optimizer param group. Both the L1 term and the proximal step act inside the optimizer
step, as hooks of the optimizer that really steps (attached when training begins: under ZeRO offload it can be a
DeepSpeedCPUAdam that accelerate built in place of the Trainer's), on the group's own tensors: the gates themselves
(single process, DDP), their local DTensor shards (FSDP2) or DeepSpeed's fp32 master partitions (ZeRO-2/3, on the
CPU with offload), which are what the optimizer really owns and what the model's gates are copied from. Both are
elementwise, hence shard-local, and need no communication.

- L1: before the update, grad += λ/N · sign(g) (N = number of gates): the gradient of λ · mean|g| added to the
  loss, applied once per optimizer step (after gradient clipping, where a loss term would be clipped with the rest).
- prox, after the update, threshold ξ (scheduled):
  `textbook`: g ← sign(g) · max(|g| − lr·ξ, 0), the proximal operator of lr·ξ·‖g‖₁;
  `sora`: the original repository's in-place sequence g[g>ξ] −= ξ; g[g<−ξ] += ξ; g[|g|<ξ] = 0, which zeroes
  every |g| < 2ξ and shrinks the rest by ξ, independently of the learning rate.
"""

import math

import numpy as np
import torch

from ..distributed.backends import foreach_add_sign_, foreach_copy_, gathered
from ..adapters.rank_layer import RankLoraLinear
from .base import RankController

PROX_GROUP = "flexrank_sora_gates"


def threshold_schedule(step: int, xi: float, dense_steps: int, max_threshold: float | None, stages: int,
                       stage_steps: int, kind: str) -> float:
    """ξ at an optimizer step: 0 during the dense phase, then `xi`, rising in `stages` steps to max_threshold."""
    if step < dense_steps:
        return 0.0
    if max_threshold is None or stages <= 1:
        return xi
    stage = min((step - dense_steps) // stage_steps, stages - 1)
    if kind == "linear":
        values = np.linspace(xi, max_threshold, stages)
    else:  # log_linear / exp_linear, as SoRA's _lambdas (xi must be > 0 for these)
        values = np.logspace(math.log10(xi), math.log10(max_threshold), stages)
        if kind == "exp_linear":
            values = xi + max_threshold - values[::-1]
    return float(values[stage])


class SoRAController(RankController):
    def __init__(self, layers: dict[str, RankLoraLinear], sparse_lambda: float, threshold: float, prox: str = "sora",
                 gate_lr: float | None = None, dense_steps: int = 0, max_threshold: float | None = None,
                 stages: int = 1, stage_steps: int = 1, kind: str = "linear", adapter: str = "default"):
        super().__init__(layers, adapter)
        self.sparse_lambda, self.prox, self.gate_lr = sparse_lambda, prox, gate_lr
        self.schedule = dict(xi=threshold, dense_steps=dense_steps, max_threshold=max_threshold, stages=stages,
                             stage_steps=stage_steps, kind=kind)
        self.num_gates = sum(layer.r[adapter] for layer in layers.values())
        self.step = 0
        self._hooked: dict[torch.optim.Optimizer, tuple] = {}  # optimizer -> its hook handles
        self.hook_calls = 0  # optimizer steps in which the L1 hook found the gates
        for layer in layers.values():
            layer.lora_gate[adapter].requires_grad_(True)

    def threshold(self, step: int | None = None) -> float:
        return threshold_schedule(self.step if step is None else step, **self.schedule)

    def stage_of(self, step: int) -> int:
        """-1 in the dense phase, then the index of the threshold stage."""
        s = self.schedule
        if step < s["dense_steps"]:
            return -1
        return min((step - s["dense_steps"]) // s["stage_steps"], s["stages"] - 1)

    # -- optimizer wiring -------------------------------------------------------------------------------------
    def optimizer_groups(self, model) -> list[dict]:
        gates = [p for n, p in model.named_parameters() if ".lora_gate." in n]
        group = {"params": gates, "weight_decay": 0.0, PROX_GROUP: True}
        return [group if self.gate_lr is None else {**group, "lr": self.gate_lr}]

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        if optimizer in self._hooked:
            return
        self._hooked[optimizer] = (optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._l1_gradient(opt)),
                                   optimizer.register_step_post_hook(lambda opt, args, kwargs: self._prox(opt)))

    def attachment_problem(self, optimizers: list[torch.optim.Optimizer]) -> str | None:
        carrying = [o for o in optimizers if any(g.get(PROX_GROUP) for g in o.param_groups)]
        names = ", ".join(type(o).__name__ for o in optimizers)
        if not carrying:
            return (f"SoRA's gate param group is not in the optimizer that steps ({names}); was the optimizer "
                    "built elsewhere (e.g. an `optimizer` section in the DeepSpeed config)?")
        if any(o not in self._hooked for o in carrying):
            return f"SoRA's L1/prox hooks are not attached to the optimizer that steps ({names})"
        return None

    def optimizer_hook_calls(self) -> int:
        return self.hook_calls

    def _gate_tensors(self, optimizer):
        """(group, values, grad) for every tensor of the gate group: local shards of FSDP2 DTensors."""
        local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
        for group in optimizer.param_groups:
            if group.get(PROX_GROUP):
                for p in group["params"]:
                    yield group, local(p), None if p.grad is None else local(p.grad)

    @torch.no_grad()
    def _l1_gradient(self, optimizer) -> None:
        # ZeRO steps one param group per optimizer.step() call: the gate group is empty in all calls but one.
        gates = list(self._gate_tensors(optimizer))
        self.hook_calls += bool(gates)
        with_grad = [(p, grad) for _, p, grad in gates if grad is not None]
        if with_grad:  # one foreach call over all gates rather than two operators per module
            foreach_add_sign_([g for _, g in with_grad], [p for p, _ in with_grad], self.sparse_lambda / self.num_gates)

    @torch.no_grad()
    def _prox(self, optimizer) -> None:
        xi = self.threshold()
        if xi <= 0:
            return
        by_group: dict[int, tuple[dict, list[torch.Tensor]]] = {}
        for group, p, _ in self._gate_tensors(optimizer):
            by_group.setdefault(id(group), (group, []))[1].append(p)
        for group, tensors in by_group.values():
            # Elementwise, so applied once to the group's gates concatenated (the same values as gate by gate), with
            # elementwise selects only: boolean-mask indexing (p[p > xi] -= xi) would wait for the device each time.
            p = torch.cat([t.reshape(-1) for t in tensors])
            if self.prox == "textbook":
                p = torch.sign(p) * torch.clamp(p.abs() - group["lr"] * xi, min=0)
            else:  # the original repository's sequence g[g>ξ] −= ξ; g[g<−ξ] += ξ; g[|g|<ξ] = 0, same values:
                # an entry the first line shrinks stays > 0, so the second line acts on the entries < −ξ as they were.
                p = torch.where(p > xi, p - xi, torch.where(p < -xi, p + xi, p))
                p.masked_fill_(p.abs() < xi, 0)
            parts = p.split([t.numel() for t in tensors])
            foreach_copy_(tensors, [part.view_as(t) for part, t in zip(parts, tensors)])

    # -- controller interface -------------------------------------------------------------------------------
    def before_pass(self, step: int, pass_index: int) -> None:
        self.step = step

    def gate_values(self) -> dict[str, torch.Tensor]:
        """Full gate vectors per module (gathered from ZeRO-3 / FSDP2 shards: a collective)."""
        names = list(self.layers)
        with gathered([self.layers[n].lora_gate[self.adapter] for n in names]) as full:
            if not full:
                return {}
            # One copy to the host for all gates (a copy per gate would wait for the device once per module).
            flat = torch.cat([t.detach().float().reshape(-1).to(full[0].device) for t in full]).cpu()
            return {n: part.view_as(t) for n, part, t in zip(names, flat.split([t.numel() for t in full]), full)}

    def active_rank(self) -> int:
        return int(sum(int(torch.count_nonzero(g)) for g in self.gate_values().values()))  # host copies

    def log_metrics(self) -> dict[str, float]:
        gates = torch.cat(list(self.gate_values().values()))
        return {"sora/threshold": self.threshold(), "sora/zero_gates": float((gates == 0).float().mean()),
                "sora/active_rank": float(torch.count_nonzero(gates)), "sora/l1": float(gates.abs().mean())}

    def state_dict(self) -> dict:
        # The gates themselves are model parameters (saved with the model and the optimizer state).
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
