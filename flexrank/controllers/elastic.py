"""Elastic LoRA supernet (LoNAS / Shears NLS): a nested sub-rank per module group, sampled per optimizer step;
optionally with in-place distillation from the maximal subnet (elastic/distillation.py)."""

from collections.abc import Callable

import torch
import torch.distributed as dist

from ..adapters.rank_layer import RankLoraLinear, set_widths
from ..elastic.base_masks import BaseMasks
from ..elastic.distillation import Distillation
from ..elastic.search_space import SearchSpace
from .base import LossNormalisation, RankController

SUBNETS = ("maximal", "heuristic", "minimal")


class ElasticController(RankController):
    def __init__(self, layers: dict[str, RankLoraLinear], space: SearchSpace, seed: int,
                 steps_per_epoch: int, sandwich: bool = False, adapter: str = "default",
                 base_masks: BaseMasks | None = None, base_order: dict[str, torch.Tensor] | None = None,
                 distill: Distillation | None = None):
        super().__init__(layers, adapter)
        # The importance order applied to the base's channels before training (elastic/importance.py): kept in every
        # checkpoint, so a resumed run permutes its fresh base exactly as the run that wrote the checkpoint did.
        self.base_order = base_order
        self.space, self.seed, self.steps_per_epoch, self.sandwich = space, seed, steps_per_epoch, sandwich
        self.distill = distill
        # The base-width groups' activation masks (LoNAS elastic MLP / heads), set with the ranks on every activate.
        self.base_masks = base_masks
        if base_masks is None and space.base_module_widths(space.maximal()):
            raise ValueError("a search space with base-width groups needs the BaseMasks that apply them")
        # Module -> (width, the layer's mask_generation right after this controller wrote it): a mask is written
        # only when its width changes or someone else wrote it since (decided in Python: no tensor is read).
        self._written: dict[str, tuple[int, int]] = {}
        self.config: dict[str, int] = space.maximal()
        self.activate(self.config)
        self.history: dict[int, dict[str, int]] = {}  # optimizer step -> sampled subnet (logged by the trainer)
        # Training loss of each optimizer step's sampled subnet (NNCF NLS's loss_recorder): the search ranks
        # configurations by it. Summed over micro-batches here, averaged over processes when the step ends.
        self.losses: dict[int, float | torch.Tensor] = {}  # tensors until read (no device sync per step)
        self._step_loss: dict[int, torch.Tensor] = {}
        # Distillation: the pass being trained, the sandwich's maximal-pass logits (the teacher of the micro-batch's
        # other passes), the sampled subnet's labels' loss of the micro-batch (what the search ranks by, rather
        # than the mixed loss), its distillation term summed per step, and the terms of steps not logged yet.
        self._pass = (0, 0)
        self._teacher_cache: torch.Tensor | None = None
        self._labels_loss: torch.Tensor | None = None
        self._step_distill: dict[int, torch.Tensor] = {}
        self._distill_unlogged: list[torch.Tensor] = []

    def subnet(self, which: str | dict) -> dict[str, int]:
        """A named subnet (maximal / heuristic / minimal) or an explicit {group: width}, validated."""
        if isinstance(which, dict):
            return self.space.validate_subnet(which)
        return getattr(self.space, which)()

    def activate(self, which: str | dict) -> dict[str, int]:
        self.config = self.subnet(which)
        self._set_rank_widths(self.space.module_widths(self.config))
        if self.base_masks is not None:  # Python state read by the hooks: nothing is written to a tensor here
            self.base_masks.set_widths(self.space.base_module_widths(self.config))
        return self.config

    def _set_rank_widths(self, widths: dict[str, int]) -> None:
        """The modules' prefix masks, written in one foreach copy for those whose width changed (a micro-batch
        or a pass of the same subnet, or a step within a sample_rate window, writes nothing)."""
        stale, others = [], []
        for name, width in widths.items():
            layer = self.layers[name]
            generation = getattr(layer, "mask_generation", None)
            if generation is None:  # not a RankLoraLinear (the nncf quantizer's adapter): its own set_width
                others.append((layer, width))
            elif self._written.get(name) != (width, generation):
                stale.append((name, layer, width))
        if stale:
            set_widths([layer for _, layer, _ in stale], [width for _, _, width in stale], self.adapter)
            self._written.update((name, (width, layer.mask_generation)) for name, layer, width in stale)
        for layer, width in others:
            layer.set_width(width, self.adapter)

    def passes(self, step: int) -> int:
        return 3 if self.sandwich else 1

    def before_pass(self, step: int, pass_index: int) -> None:
        sampled = self.space.config_for_step(self.seed, step, self.steps_per_epoch)
        # Sandwich rule (max, min, random in one optimizer step), as in EFTNAS; else one sampled subnet.
        self.activate((["maximal", "minimal"] + [sampled])[pass_index] if self.sandwich else sampled)
        self.history[step] = sampled
        self._pass = (step, pass_index)
        if pass_index == 0:
            self._teacher_cache = None

    def _trains_maximal(self) -> bool:
        return self.config == self.space.maximal()

    def teacher_logits(self, forward: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """The maximal subnet's logits on the pass's batch, unless the pass trains the maximal subnet (it is the
        teacher: labels only). With the sandwich rule the micro-batch's first pass is the maximal subnet and its
        logits are reused; else one forward without gradient, with the maximal subnet's masks (rank and base
        widths), after which the pass's own masks are set again, before its forward (and any recomputation of it
        in the backward). Every process trains the same subnet, so all run this forward (a collective under
        ZeRO-3 / FSDP2) or none."""
        if self.distill is None or self._trains_maximal():
            return None
        if self._teacher_cache is not None:
            return self._teacher_cache
        student = self.config
        self.activate("maximal")
        try:
            with torch.no_grad():
                return forward()
        finally:
            self.activate(student)

    def distilled_loss(self, loss: torch.Tensor, logits: torch.Tensor | None, teacher: torch.Tensor | None,
                       batch: dict, norm: LossNormalisation) -> torch.Tensor:
        if self.distill is None:
            return loss
        step, pass_index = self._pass
        last = pass_index == self.passes(step) - 1  # the step's sampled subnet
        if last:
            self._labels_loss = loss.detach() / norm.divisor
        if teacher is None:
            if self.sandwich and pass_index == 0:  # the maximal subnet: the teacher of the passes that follow
                self._teacher_cache = _require_logits(logits).detach()
            return loss
        term = self.distill.term(_require_logits(logits), teacher, batch, norm.items, norm.factor)
        if last:
            done = term.detach() / norm.divisor
            self._step_distill[step] = self._step_distill[step] + done if step in self._step_distill else done
        return self.distill.mix(loss, term)

    def record_loss(self, step: int, losses: list[torch.Tensor]) -> None:
        # The last pass is the sampled subnet (a sandwich step runs maximal, minimal, then sampled). Distilled, the
        # subnet's labels' loss, not the mixed one: steps of the maximal subnet (labels only) stay comparable.
        loss = (losses[-1] if self._labels_loss is None else self._labels_loss).detach().float()
        self._labels_loss, self._teacher_cache = None, None
        self._step_loss[step] = self._step_loss[step] + loss if step in self._step_loss else loss

    def after_optimizer_step(self, step: int) -> None:
        loss = self._step_loss.pop(step, None)
        if loss is None:
            return
        distill = self._step_distill.pop(step, None)  # every process distilled this step, or none did
        if distill is not None:
            loss = torch.stack([loss, distill.float()])
        if dist.is_available() and dist.is_initialized():  # every process runs this hook: a collective is safe
            dist.all_reduce(loss)
            loss = loss / dist.get_world_size()
        if distill is not None:
            loss, distill = loss[0], loss[1]
            self._distill_unlogged.append(distill)
        self.losses[step] = loss

    def step_losses(self) -> dict[int, float]:
        """Optimizer step -> training loss of the subnet sampled at that step (averaged over processes)."""
        self.losses = {k: float(v) for k, v in self.losses.items()}
        return dict(self.losses)

    def log_metrics(self) -> dict[str, float]:
        widths = [self.config[g.name] for g in self.space.groups if g.base is None]  # adapter ranks only
        metrics = {"elastic/active_rank": float(self.active_rank()),
                   "elastic/mean_group_width": sum(widths) / max(len(widths), 1)}
        if self._distill_unlogged:  # read here, on logging steps only: no device sync per step
            # T^2 x KL of the sampled subnet, before weighting, averaged over the distilled steps since the last log
            metrics["elastic/distill_loss"] = float(torch.stack(self._distill_unlogged).mean())
            self._distill_unlogged = []
        return metrics

    def state_dict(self) -> dict:
        # Sampling is a pure function of (seed, step): the seed, the active config, the losses (and the base order)
        # are all there is.
        state = {"seed": self.seed, "config": dict(self.config), "losses": self.step_losses()}
        return state if self.base_order is None else {**state, "base_order": self.base_order}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("base_order")
        if saved is not None and (self.base_order is None or saved.keys() != self.base_order.keys() or
                                  not all(torch.equal(saved[k], self.base_order[k]) for k in saved)):
            raise ValueError("the base's channel order differs from the one the state was trained with "
                             "(adapter.elastic.importance): the adapter would not fit the base")
        self.seed = state["seed"]
        self.losses = dict(state.get("losses", {}))  # absent in states written before losses were recorded
        self.activate(state["config"])


def _require_logits(logits: torch.Tensor | None) -> torch.Tensor:
    if logits is None:
        raise RuntimeError("[flexrank] adapter.elastic.distill: the model returned no logits in training (a fused "
                           "loss kernel such as liger's skips them); turn it off (model.liger_kernel: false)")
    return logits
