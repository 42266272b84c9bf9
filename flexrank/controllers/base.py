"""The interface every rank controller implements; a unit test drives it without a Trainer.

A controller only writes mask buffers (identical on every rank, so no communication) or acts inside the
optimizer step; it never edits a parameter behind the optimizer's back (under ZeRO the optimizer owns the
fp32 master copy and such an edit is silently undone).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..adapters.rank_layer import RankLoraLinear


STATE_FILE = "flexrank_controller.pt"  # a controller's state, in a run's supernet/ and in every checkpoint


@dataclass(frozen=True)
class StepPlan:
    """What controllers need to know of the training schedule (read from the run's TrainingArguments)."""
    steps_per_epoch: int
    total_steps: int
    gradient_accumulation_steps: int
    seed: int
    learning_rate: float


@dataclass(frozen=True)
class LossNormalisation:
    """How the Trainer normalised the labels' loss of one micro-batch (training/transformers_internals.py), so that a
    term over the same items can be normalised alike: the items' losses summed and divided by `items` (transformers'
    num_items_in_batch: the labelled items of the whole optimizer step, all micro-batches and processes), or, with
    `items` None, averaged over this micro-batch's labelled items; then multiplied by `factor` (the number of
    processes, which the gradients' average divides out again). `divisor`: what the training step then divides the
    loss by (the gradient accumulation steps, or 1 when the loss is normalised over the whole step already)."""
    items: torch.Tensor | int | None = None
    factor: float = 1.0
    divisor: float = 1.0


def host_sum(values: list) -> float:
    """The sum of numbers and scalar tensors as a Python number, summed on each tensor's device and read once per
    device (not once per tensor: every read waits for the device)."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    total = 0
    for v in values:
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(v.detach().reshape(()))
        else:
            total += v
    return total + sum(torch.stack(vs).double().sum().item() for vs in by_device.values())


class RankController:
    def __init__(self, layers: dict[str, RankLoraLinear], adapter: str = "default"):
        self.layers, self.adapter = layers, adapter

    def passes(self, step: int) -> int:
        """Forward/backward passes per micro-batch at this optimizer step (a sandwich rule uses several)."""
        return 1

    def before_pass(self, step: int, pass_index: int) -> None:
        """Set the masks for this pass of optimizer step `step`. Must depend on (step, pass_index) only, so
        every process, micro-batch and gradient-checkpoint recomputation sees the same subnet."""

    def optimizer_groups(self, model) -> list[dict]:
        """Param groups of its own (looked up by name in `model`, which may be FSDP2-wrapped); their params
        are left out of the Trainer's default groups."""
        return []

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Called when training begins with each optimizer that really steps (backends.stepping_optimizers: under
        DeepSpeed not the Trainer's, and with ZeRO offload possibly a DeepSpeedCPUAdam built from its param
        groups): hooks go here. A second call with the same optimizer must not add the hooks twice."""

    def attachment_problem(self, optimizers: list[torch.optim.Optimizer]) -> str | None:
        """Why the hooks could not act on these stepping optimizers (e.g. its param group is missing from them),
        or None when they are in place. Checked when training begins."""
        return None

    def optimizer_hook_calls(self) -> int | None:
        """How many optimizer steps its hooks have acted in (None: it has no optimizer hooks). The trainer checks
        after the first step that they did act, so hooks on an optimizer that never steps fail loudly."""
        return None

    def record_loss(self, step: int, losses: list[torch.Tensor]) -> None:
        """The detached training losses of one micro-batch of step `step`, one per pass, on this process."""

    def on_final_gradients(self) -> None:
        """Runs once per optimizer step when its gradients are final (accumulated, averaged over processes),
        before the optimizer uses them; on every process (gathering sharded values is a collective)."""

    def teacher_logits(self, forward: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """In-place distillation: called in each training pass before the pass's own forward. The logits the pass
        learns from besides its labels (`forward()` runs the model on the pass's batch, without its labels; the
        controller sets the teacher's masks around it and restores the pass's), or None."""
        return None

    def distilled_loss(self, loss: torch.Tensor, logits: torch.Tensor | None, teacher: torch.Tensor | None,
                       batch: dict, norm: LossNormalisation) -> torch.Tensor:
        """The training loss of the pass, from its labels' loss `loss` (as the Trainer computed it, normalised as
        `norm` says), its `logits`, and `teacher` (what teacher_logits returned) on `batch` (with its labels)."""
        return loss

    def extra_loss(self) -> torch.Tensor | None:
        """A term added to the training loss (regulariser), or None."""
        return None

    def after_optimizer_step(self, step: int) -> None:
        """Runs right after the optimizer step of `step`, before gradients are zeroed."""

    def log_metrics(self) -> dict[str, float]:
        return {}

    def active_rank(self) -> int:
        """Ranks the masks leave on (masks are replicated buffers: readable on every backend, unlike the
        gates, which ZeRO-3 partitions). Reads the device: for logging steps and reports, not per step."""
        return int(host_sum([torch.count_nonzero(l.lora_rank_mask[self.adapter]) for l in self.layers.values()]))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
