"""The recipe's `training` section as one `transformers.TrainingArguments`, built once; every training value a run
needs (batch sizes, accumulation, steps, seed, learning rate) is read from it, so no transformers default is
re-derived here. Also the resume point, which may change gradient accumulation when the world size changed."""

import math
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainingArguments

from ..checkpoints import manifest
from ..config import RunConfig
from ..controllers.base import StepPlan
from ..distributed import env
from ..errors import ConfigError
from ..models.kernels import choose_liger


@dataclass(frozen=True)
class ResumePoint:
    checkpoint: Path | None
    overrides: dict  # TrainingArguments values that keep the checkpoint's global batch on this world size


def training_arguments(cfg: RunConfig, overrides: dict | None = None, log: bool = True) -> TrainingArguments:
    elastic = cfg.adapter.elastic
    if cfg.model.liger_kernel == "auto" and elastic is not None and elastic.distill is not None:
        # liger's fused cross-entropy skips the logits that in-place distillation compares (true is refused)
        use_liger, why = False, "auto: off (adapter.elastic.distill needs the logits)"
    else:
        use_liger, why = choose_liger(cfg.model.liger_kernel)
    if log and env.is_main_process():
        print(f"[flexrank] liger kernel: {'on' if use_liger else 'off'} ({why})")
    values = {k: v for k, v in cfg.training.items() if k != "resume_from_checkpoint"}  # resume: resume_point()
    try:
        return TrainingArguments(**{**values, **(overrides or {}), "use_liger_kernel": use_liger})
    except (TypeError, ValueError) as exc:
        raise ConfigError("training", dict(cfg.training), "valid TrainingArguments",
                          str(exc).splitlines()[0]) from None


def inspection_overrides() -> dict:
    """For arguments built only to be read (checking a recipe, reloading a finished run), maybe on a machine without
    the run's accelerator (a login node): no integration starts, and GPU-only options are checked at run time."""
    import torch

    return {"report_to": "none", **({} if torch.cuda.is_available() else {"use_cpu": True, "tf32": None})}


def step_plan(args: TrainingArguments, n_train: int) -> StepPlan:
    """Optimizer steps per epoch and in all, from the arguments and the training set's size. The process group
    does not exist yet when controllers are built; the launcher's world size does."""
    batches = math.ceil(n_train / (args.per_device_train_batch_size * env.world_size()))
    per_epoch = max(1, batches // args.gradient_accumulation_steps)
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
    return StepPlan(steps_per_epoch=per_epoch, total_steps=total,
                    gradient_accumulation_steps=args.gradient_accumulation_steps, seed=args.seed,
                    learning_rate=args.learning_rate)


def resume_point(cfg: RunConfig, out: Path) -> ResumePoint:
    """The checkpoint to resume from, adapting gradient accumulation when the world size changed so that every
    optimizer step still sees the same samples (global batch = per-device batch x accumulation x processes).
    Whatever the backend: the trainable state of a checkpoint also exists in a world-size-independent form."""
    main = env.is_main_process()
    ckpt = manifest.resolve_resume(cfg.training.get("resume_from_checkpoint"), out,
                                   warn=print if main else (lambda *_: None), set_aside=main)
    if ckpt is None:
        return ResumePoint(None, {})
    saved, world = manifest.meta(ckpt), env.world_size()
    if saved["world_size"] == world:  # sharded state then resumes from the checkpoint's portable_state file
        return ResumePoint(ckpt, {})
    per_device = training_arguments(cfg, log=False).per_device_train_batch_size
    global_batch = saved["per_device_train_batch_size"] * saved["gradient_accumulation_steps"] * saved["world_size"]
    per_step = per_device * world
    if global_batch % per_step:
        raise ConfigError("training.per_device_train_batch_size", per_device,
                          f"a divisor of the checkpoint's global batch {global_batch} / {world} processes")
    accumulation = global_batch // per_step
    if main:
        print(f"[flexrank] resume: world size {saved['world_size']} -> {world}; gradient_accumulation_steps "
              f"{saved['gradient_accumulation_steps']} -> {accumulation} keeps the global batch at {global_batch} "
              f"samples, so training continues at sample {saved['global_step'] * global_batch}")
    return ResumePoint(ckpt, {"gradient_accumulation_steps": accumulation})
