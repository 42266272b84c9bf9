"""The trainable state in a form that does not depend on the world size or the sharding backend, so a checkpoint
can resume on another number of processes and under another backend (ZeRO-3 -> FSDP2, FSDP2 -> 1 process, ...).

Every checkpoint gets `flexrank_portable.pt`, written by the main process after gathering: each trainable
parameter (adapters, gates) as a full fp32 tensor (the optimizer's master copy under DeepSpeed), its Adam state
(exp_avg, exp_avg_sq, step) as full tensors, and the LR scheduler. The data position is trainer_state.json (global
step, epoch; the sampler is a function of seed and epoch) and the controller's state is its own file
(controllers.base.STATE_FILE): both are world-size independent already and are read as usual.

Why not DCP or DeepSpeed's universal checkpoint: DCP reshards FSDP2/DDP state but cannot read ZeRO partitions;
the universal checkpoint only goes ZeRO -> ZeRO, needs an offline conversion of every shard, and its ZeRO-3 loader
copies param group 0's hyper-parameters into every group (controllers keep their own groups, e.g. SoRA's
gate_lr). The adapter state is small, so gathering it whole is cheap and one format serves every pair of layouts.

On resume, when the checkpoint's (backend, world size) differs from the running one, the Trainer still gets the
checkpoint (trainer state, RNG, data skipping), but its loading of sharded model and optimizer files is skipped
and this file is loaded into the model and the optimizer that steps (DeepSpeed's fp32 master partitions, FSDP2's
DTensor shards) once they exist.
"""

from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import manifest as checkpoints
from ..io import atomic_path
from ..distributed.backends import _full, backend_of, link_zero12_optimizer_state, unwrap_optimizer
from ..errors import ConfigError
from ..training.transformers_internals import CheckpointLoading, rewind_scheduler

PORTABLE_FILE = "flexrank_portable.pt"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
UNSHARDED = ("single", "ddp")  # the Trainer's own files hold full tensors


def _trainable(trainer) -> list[tuple[str, torch.nn.Parameter]]:
    # trainer.model is the peft model on every backend (inside the DeepSpeed engine; FSDP2 shards it in place),
    # so the names are the same whatever the layout.
    return [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]


def _zero_optimizer(trainer):
    """DeepSpeed's ZeRO optimizer (it owns the fp32 master partitions and their Adam state)."""
    return trainer.model_wrapped.optimizer


def gather(trainer) -> dict:
    """The trainable state as full CPU tensors. A collective (ZeRO partitions, FSDP2 shards): every process
    calls it, with the same parameters in the same order."""
    params, optim = {}, {}
    named = _trainable(trainer)
    if trainer.is_deepspeed_enabled:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        zero = _zero_optimizer(trainer)
        steps = {float(s["step"]) for s in zero.optimizer.state.values() if "step" in s}
        if steps:
            link_zero12_optimizer_state(zero)
        if len(steps) > 1:  # every group steps together; the format keeps one step per parameter anyway
            raise RuntimeError(f"ZeRO parameter groups at different Adam steps {sorted(steps)}")
        step = next(iter(steps), None)
        for name, p in named:
            params[name] = safe_get_full_fp32_param(p).detach().cpu().float()
            if step is not None:
                optim[name] = {k: safe_get_full_optimizer_state(p, k).detach().cpu().float() for k in ADAM_KEYS}
                optim[name]["step"] = step
    else:
        state = unwrap_optimizer(trainer.optimizer).state
        for name, p in named:
            params[name] = _full(p.detach()).cpu().float()
            if p in state and "step" in state[p]:
                optim[name] = {k: _full(state[p][k]).detach().cpu().float() for k in ADAM_KEYS}
                optim[name]["step"] = float(state[p]["step"])
    return {"params": params, "optimizer": optim, "scheduler": trainer.lr_scheduler.state_dict(),
            "global_step": trainer.state.global_step, "backend": backend_of(trainer),
            "world_size": trainer.args.world_size}


def save(trainer, folder: Path) -> None:
    """Gather (every process) and write atomically (main process)."""
    state = gather(trainer)
    if trainer.args.should_save:
        with atomic_path(folder / PORTABLE_FILE) as tmp:
            torch.save(state, tmp)


class PortableStateCallback(TrainerCallback):
    """Writes PORTABLE_FILE into each checkpoint. It must run before the callback that marks the checkpoint
    complete (FlexTrainer adds it first), so that the manifest lists the file."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        save(self.trainer, folder)


def layout_changed(ckpt: Path, backend: str, world_size: int) -> bool:
    """Whether resuming from `ckpt` must go through PORTABLE_FILE (the checkpoint was written under another
    backend or world size); a clear error when it is needed and missing."""
    if not (ckpt / checkpoints.MANIFEST).is_file():
        return False  # not written by flexrank: the Trainer loads it as it is
    saved = checkpoints.meta(ckpt)
    if (saved["backend"], saved["world_size"]) == (backend, world_size):
        return False
    if (ckpt / PORTABLE_FILE).is_file():
        return True
    if saved["backend"] in UNSHARDED and backend in UNSHARDED:
        return False  # an older checkpoint: the Trainer's files are full tensors, it loads them itself
    raise ConfigError("training.resume_from_checkpoint", str(ckpt),
                      f"a checkpoint with {PORTABLE_FILE} (or resume with {saved['world_size']} processes under "
                      f"{saved['backend']})", f"it was written by {saved['world_size']} {saved['backend']} "
                      f"processes; this run is {world_size} {backend}")


def _local(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `like`: this process's DTensor shard for FSDP2, else the tensor itself."""
    if hasattr(like, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        # Every process holds the same full tensor: each takes its own shard, no communication.
        return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)
    return full.to(device=like.device, dtype=like.dtype)


def _step_tensor(step: float, group: dict, param: torch.Tensor) -> torch.Tensor:
    on_device = group.get("capturable") or group.get("fused")  # torch Adam keeps `step` with the param then
    return torch.tensor(step, dtype=torch.float32, device=param.device if on_device else "cpu")


@torch.no_grad()
def load(trainer, ckpt: Path) -> None:
    """Load PORTABLE_FILE into the model, the optimizer that steps and the scheduler. Every process calls it
    (ZeRO-3 writes are collective), after the optimizer, the engine and the scheduler exist."""
    state = torch.load(ckpt / PORTABLE_FILE, map_location="cpu", weights_only=True)
    named = dict(_trainable(trainer))
    if named.keys() != state["params"].keys():
        missing, extra = named.keys() - state["params"].keys(), state["params"].keys() - named.keys()
        raise ConfigError("training.resume_from_checkpoint", str(ckpt), "a checkpoint of this adapter",
                          f"trainable parameters differ: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    if trainer.is_deepspeed_enabled:
        _load_into_zero(trainer, named, state)
    else:
        opt = unwrap_optimizer(trainer.optimizer)
        group_of = {p: g for g in opt.param_groups for p in g["params"]}
        for name, p in named.items():
            p.copy_(_local(state["params"][name], p))
            if name in state["optimizer"]:
                saved = state["optimizer"][name]
                opt.state[p] = {"step": _step_tensor(saved["step"], group_of[p], p),
                                **{k: _local(saved[k], p) for k in ADAM_KEYS}}
    rewind_scheduler(trainer.lr_scheduler, state["scheduler"])


def _load_into_zero(trainer, named: dict, state: dict) -> None:
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero = _zero_optimizer(trainer)
    steps = {s["step"] for s in state["optimizer"].values()}
    if steps:  # Adam's state is created lazily at the first step: create it, then fill in the saved values
        step = steps.pop()
        for group in zero.optimizer.param_groups:
            for flat in group["params"]:
                zero.optimizer.state[flat] = {"step": _step_tensor(step, group, flat),
                                              **{k: torch.zeros_like(flat) for k in ADAM_KEYS}}
        link_zero12_optimizer_state(zero)
    for name, p in named.items():
        value = state["params"][name]
        # The visible (low-precision) parameter and the optimizer's fp32 master copy are separate tensors.
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.data.copy_(value.to(p.dtype))
        safe_set_full_fp32_param(p, value)
        for key in ADAM_KEYS if name in state["optimizer"] else ():
            safe_set_full_optimizer_state(p, state["optimizer"][name][key], key)


class PortableResume(CheckpointLoading):
    """Trainer mixin: resume through PORTABLE_FILE when the checkpoint's layout differs from this run's. The
    Trainer keeps resume_from_checkpoint for trainer_state.json (global step, epoch, batches to skip) and the RNG
    files; only its model, optimizer and scheduler loading is replaced (transformers_internals.CheckpointLoading)."""

    def train(self, resume_from_checkpoint=None, **kwargs):
        self.replaces_checkpoint_loading = bool(resume_from_checkpoint) and layout_changed(
            Path(resume_from_checkpoint), backend_of(self), self.args.world_size)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def load_replaced_checkpoint(self, checkpoint: Path) -> None:
        load(self, checkpoint)
        if self.is_world_process_zero():
            print(f"[flexrank] resume: loaded the trainable state from {checkpoint / PORTABLE_FILE} "
                  f"(written under another backend or world size)")
