"""The thin Trainer subclass: it runs a rank controller's hooks at the right points of a training step and
keeps the controller's state in checkpoints. All rank logic lives in the controller."""

import json
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from . import checkpoints
from .portable_state import PortableResume, PortableStateCallback
from .backends import backend_of, call_when_gradients_are_final
from .controllers import RankController

STATE_FILE = "flexrank_controller.pt"


class _ControllerCallback(TrainerCallback):
    def __init__(self, controller: RankController):
        self.controller = controller

    def on_optimizer_step(self, args, state, control, **kwargs):
        # After optimizer.step(), before zero_grad(); state.global_step is still the step being taken.
        self.controller.after_optimizer_step(state.global_step)


class FlexTrainer(PortableResume, Trainer):
    def __init__(self, *args, controller: RankController | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.controller = controller
        # World-size-independent trainable state in every checkpoint; must run before the checkpoint is marked
        # complete (register any on_save completion callback after it).
        self.add_callback(PortableStateCallback(self))
        if controller is not None:
            self.add_callback(_ControllerCallback(controller))

    def create_optimizer(self, model=None):
        if self.controller is None or self.optimizer is not None:
            return super().create_optimizer(model)
        groups = self.controller.optimizer_groups(self.model if model is None else model)
        owned = [p for g in groups for p in g["params"]]
        for p in owned:  # hidden from the default groups while the Trainer builds them
            p.requires_grad_(False)
        try:
            optimizer = super().create_optimizer(model)
        finally:
            for p in owned:
                p.requires_grad_(True)
        for group in groups:
            optimizer.add_param_group(group)
        self.controller.attach(optimizer)
        call_when_gradients_are_final(self, optimizer, self.controller.on_final_gradients)
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.controller is None:
            return super().training_step(model, inputs, num_items_in_batch)
        step = self.state.global_step
        losses = []
        # Each pass (one, or several for a sandwich rule) backpropagates into the same gradients before the step.
        for index in range(self.controller.passes(step)):
            self.controller.before_pass(step, index)
            losses.append(super().training_step(model, inputs, num_items_in_batch))
        self.controller.record_loss(step, losses)
        return torch.stack(losses).mean()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        extra = self.controller.extra_loss() if self.controller is not None else None
        if extra is not None:
            loss = loss + extra
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        if self.controller is not None and "loss" in logs:
            logs = {**logs, **self.controller.log_metrics()}
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        keep = self.args.save_total_limit
        self.args.save_total_limit = None  # rotate only once this checkpoint is complete (below)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = keep
        run_dir = Path(self._get_output_dir(trial))
        folder = run_dir / f"checkpoint-{self.state.global_step}"
        if self.controller is not None and self.args.should_save:
            torch.save(self.controller.state_dict(), folder / STATE_FILE)
        self.accelerator.wait_for_everyone()  # every process has written its shards
        if self.args.should_save:
            checkpoints.mark_complete(folder, self.checkpoint_meta())
            checkpoints.rotate(run_dir, keep)
        self.accelerator.wait_for_everyone()

    def checkpoint_meta(self) -> dict:
        """What a resume needs to know about the run that wrote the checkpoint (world size, batch layout)."""
        return {"global_step": self.state.global_step, "world_size": self.args.world_size,
                "backend": backend_of(self),
                "per_device_train_batch_size": self.args.per_device_train_batch_size,
                "gradient_accumulation_steps": self.args.gradient_accumulation_steps}

    def train(self, resume_from_checkpoint=None, **kwargs):
        # Here rather than in _load_from_checkpoint, which the Trainer skips under DeepSpeed.
        if self.controller is not None and resume_from_checkpoint:
            self.controller.load_state_dict(torch.load(Path(resume_from_checkpoint) / STATE_FILE, weights_only=False))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)
