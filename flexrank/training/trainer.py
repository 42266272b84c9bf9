"""The thin Trainer subclass: it runs a rank controller's hooks at the right points of a training step and
keeps the controller's state in checkpoints. All rank logic lives in the controller."""

from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput

from ..checkpoints import manifest as checkpoints
from ..distributed.backends import backend_of, call_when_gradients_are_final, stepping_optimizers
from ..checkpoints.portable_state import PortableResume, PortableStateCallback
from ..adapters.rank_layer import guard_recomputation
from ..controllers import RankController
from ..controllers.base import STATE_FILE
from ..io import atomic_path
from .transformers_internals import filter_non_finite_loss, loss_normalisation

LABEL_KEYS = ("labels", "shift_labels")  # targets: not inputs of a teacher's forward



class _ControllerCallback(TrainerCallback):
    """Puts the controller's optimizer-side work on the optimizer that really steps, once it exists (accelerate
    and DeepSpeed build or wrap it after create_optimizer), checks that it is there, and, after the first
    optimizer step, that it ran."""

    def __init__(self, trainer: "FlexTrainer", controller: RankController):
        self.trainer, self.controller = trainer, controller
        self.undo_final_gradients = None
        self.final_gradient_calls = 0

    def on_train_begin(self, args, state, control, **kwargs):
        # The Trainer has switched gradient checkpointing on by now: the mask check is only needed under it.
        guard_recomputation(self.trainer.model)
        optimizers = stepping_optimizers(self.trainer)
        for optimizer in optimizers:
            self.controller.attach(optimizer)
        problem = self.controller.attachment_problem(optimizers)
        if problem:
            raise RuntimeError(f"[flexrank] {problem} (backend {backend_of(self.trainer)})")
        if state.is_world_process_zero:
            print(f"[flexrank] {type(self.controller).__name__} hooks on the optimizer that steps: "
                  + ", ".join(type(o).__name__ for o in optimizers))
        if self.undo_final_gradients:  # an earlier train() call of this trainer
            self.undo_final_gradients()
        self.undo_final_gradients = call_when_gradients_are_final(self.trainer, self._final_gradients)
        self.first_step, self.hook_calls_before = state.global_step, self.controller.optimizer_hook_calls()
        self.final_gradient_calls = 0

    def _final_gradients(self):
        self.final_gradient_calls += 1
        self.controller.on_final_gradients()

    def on_optimizer_step(self, args, state, control, **kwargs):
        # After optimizer.step(), before zero_grad(); state.global_step is still the step being taken.
        if state.global_step == self.first_step and not self.trainer.accelerator.optimizer_step_was_skipped:
            self._check_first_step_ran_the_hooks()
        self.controller.after_optimizer_step(state.global_step)

    def _check_first_step_ran_the_hooks(self):
        where = f"backend {backend_of(self.trainer)}, optimizer " + ", ".join(
            type(o).__name__ for o in stepping_optimizers(self.trainer))
        if self.final_gradient_calls != 1:
            raise RuntimeError(f"[flexrank] the rank controller's final-gradient hook ran {self.final_gradient_calls} "
                               f"times in the first optimizer step instead of once ({where})")
        calls = self.controller.optimizer_hook_calls()
        if calls is not None and calls == self.hook_calls_before:
            raise RuntimeError(f"[flexrank] {type(self.controller).__name__}'s optimizer hooks did not run in the first "
                               f"optimizer step: they are not on the optimizer that steps ({where})")


class _CompleteCheckpoints(TrainerCallback):
    """Runs after the Trainer has written checkpoint-N from every process: the controller's state, then, once every
    process is done, the completion manifest (checkpoints.py), then the rotation, which keeps the best checkpoint.
    The Trainer's own rotation is off (FlexTrainer takes over save_total_limit): it runs before this callback, so it
    would delete older complete checkpoints while the newest one is not complete yet."""

    def __init__(self, trainer: "FlexTrainer", keep: int | None):
        self.trainer, self.keep = trainer, keep

    def on_save(self, args, state, control, **kwargs):
        trainer = self.trainer
        run_dir = Path(args.output_dir)
        folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if args.should_save and not folder.is_dir():  # e.g. a hyper-parameter search trial, which flexrank has not
            raise RuntimeError(f"[flexrank] the Trainer's checkpoint is not at {folder}")
        if trainer.controller is not None and args.should_save:
            with atomic_path(folder / STATE_FILE) as tmp:
                torch.save(trainer.controller.state_dict(), tmp)
        trainer.accelerator.wait_for_everyone()  # every process has written its shards
        if args.should_save:
            checkpoints.mark_complete(folder, trainer.checkpoint_meta())
            checkpoints.rotate(run_dir, self.keep, protect=state.best_model_checkpoint)
        trainer.accelerator.wait_for_everyone()


class _TrainingDone(Exception):
    pass


class _StopWhenTrained(TrainerCallback):
    """A run resumed from a checkpoint at its last step (written when it was preempted during the evaluation after
    training, or by a save at the last step): the Trainer has loaded it and prepared the model, but its loop runs a
    step before it checks for the end. Stop before that step: training is done."""

    def on_step_begin(self, args, state, control, **kwargs):
        if 0 < state.max_steps <= state.global_step:
            raise _TrainingDone


class FlexTrainer(PortableResume, Trainer):
    def __init__(self, *args, controller: RankController | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.controller = controller
        self._training_pass = False  # compute_loss inside a training pass (not an evaluation's)
        self.add_callback(_StopWhenTrained())
        # on_save callbacks run in the order added: the world-size-independent trainable state is written before
        # the checkpoint is marked complete, so the manifest lists it. Rotation happens once a checkpoint is
        # complete (_CompleteCheckpoints), not inside the Trainer's save.
        self.add_callback(PortableStateCallback(self))
        keep, self.args.save_total_limit = self.args.save_total_limit, None
        self.add_callback(_CompleteCheckpoints(self, keep))
        # The Trainer's NaN/inf filter of the logged loss reads every micro-batch's loss on the host (a GPU sync per
        # step); FlexTrainer applies the same filter on the device (training_step).
        self.filter_non_finite, self.args.logging_nan_inf_filter = self.args.logging_nan_inf_filter, False
        self._flops_per_token = None  # the Trainer's FLOPs for one token, counted once (floating_point_ops)
        if controller is not None:
            self.add_callback(_ControllerCallback(self, controller))

    def train(self, resume_from_checkpoint=None, **kwargs) -> TrainOutput:
        # The controller's state: here rather than in _load_from_checkpoint, which the Trainer skips under DeepSpeed.
        if self.controller is not None and resume_from_checkpoint:
            self.controller.load_state_dict(torch.load(Path(resume_from_checkpoint) / STATE_FILE, weights_only=True))
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        except _TrainingDone:  # the training's own summary, logged as it ended (absent when it never got there)
            summary = next((h for h in reversed(self.state.log_history) if "train_runtime" in h), {})
            metrics = {k: v for k, v in summary.items() if k != "step"}
            return TrainOutput(self.state.global_step, metrics.get("train_loss", float("nan")), metrics)

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
        for group in groups:  # hooks go on the optimizer that really steps, when training begins (_ControllerCallback)
            optimizer.add_param_group(group)
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = self._training_passes(model, inputs, num_items_in_batch)
        return filter_non_finite_loss(self, loss) if self.filter_non_finite else loss

    def _training_passes(self, model, inputs, num_items_in_batch):
        if self.controller is None:
            return super().training_step(model, inputs, num_items_in_batch)
        step = self.state.global_step
        losses = []
        # Each pass (one, or several for a sandwich rule) backpropagates into the same gradients before the step.
        for index in range(self.controller.passes(step)):
            self.controller.before_pass(step, index)
            self._training_pass = True
            try:
                losses.append(super().training_step(model, inputs, num_items_in_batch))
            finally:
                self._training_pass = False
        self.controller.record_loss(step, losses)
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = self.controller is not None and self._training_pass
        batch = dict(inputs)  # with its labels (the Trainer pops them when it smooths them)
        teacher = None
        if training:  # in-place distillation: a teacher's logits on the same batch (the controller's masks)
            teacher = self.controller.teacher_logits(
                lambda: _logits(model(**{k: v for k, v in batch.items() if k not in LABEL_KEYS})))
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if training:
            logits = _logits(outputs)
            loss = self.controller.distilled_loss(loss, logits, teacher, batch,
                                                  loss_normalisation(self, num_items_in_batch, logits))
        extra = self.controller.extra_loss() if self.controller is not None else None
        if extra is not None:
            loss = loss + extra.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def floating_point_ops(self, inputs) -> int:
        """The Trainer's count (6 x tokens x non-embedding parameters), with the parameters counted once: the
        Trainer counts them again at every micro-batch, a walk over every module of the model."""
        main = getattr(self.model, "main_input_name", "input_ids")
        if main not in inputs:
            return 0
        if self._flops_per_token is None:
            self._flops_per_token = super().floating_point_ops({main: torch.empty(1)})
        return self._flops_per_token * inputs[main].numel()

    def log(self, logs, *args, **kwargs):
        if self.controller is not None and "loss" in logs:
            logs = {**logs, **self.controller.log_metrics()}
        super().log(logs, *args, **kwargs)

    def checkpoint_meta(self) -> dict:
        """What a resume needs to know about the run that wrote the checkpoint (world size, batch layout)."""
        return {"global_step": self.state.global_step, "world_size": self.args.world_size,
                "backend": backend_of(self),
                "per_device_train_batch_size": self.args.per_device_train_batch_size,
                "gradient_accumulation_steps": self.args.gradient_accumulation_steps}


def _logits(outputs) -> torch.Tensor | None:
    return outputs.get("logits") if isinstance(outputs, dict) else None  # a ModelOutput is a dict
