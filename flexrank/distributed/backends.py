"""The one place that knows how distributed backends differ at run time: the CPU shims used for tests on
machines without a GPU (never active when CUDA is present), gathering sharded parameters and gradients, the
optimizer that really steps, and where a step's gradients are final. Launch commands are built in
flexrank.launcher.launch.

It is also the one module that touches private or undocumented internals of accelerate, DeepSpeed and transformers
(where no public API does the job); `private_api_problems()` checks each against the installed versions and
tests/test_internals.py fails, naming the dependency and its version, when one changes.
"""

import inspect
import os
from collections.abc import Callable
from contextlib import contextmanager
from importlib.metadata import version

import torch

from . import env

BACKENDS = ("single", "ddp", "fsdp2", "zero2", "zero3", "zero3_offload")  # distributed.backend names


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2 DTensor shard (a collective); any other tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def apply_cpu_shims() -> bool:
    """On a machine without CUDA, make launched multi-process runs really distributed on CPU (gloo), with the
    backend the launch asked for. Stock accelerate, on CPU, either sees no distributed setup at all
    (DistributedType.NO in every process), or, with use_cpu, silently drops DeepSpeed and turns FSDP into DDP.
    - every launched process gets gloo / MULTI_CPU from accelerate's backend probe, without use_cpu, so
      accelerate's own DeepSpeed path stays enabled (DeepSpeed runs on its CPU accelerator);
    - FSDP is switched back on where accelerate only considers it for GPU-like device types.
    Returns whether the shims are active. Never active where CUDA is available."""
    if torch.cuda.is_available():
        return False
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if getattr(PartialState._prepare_backend, "_flexrank_cpu", False):
        return True
    prepare_backend, accelerator_state_init = PartialState._prepare_backend, AcceleratorState.__init__

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        backend, distributed_type = prepare_backend(self, cpu, sagemaker_dp, backend)
        if distributed_type == DistributedType.NO and env.in_launched_process() and env.world_size() > 1:
            return "gloo", DistributedType.MULTI_CPU
        return backend, distributed_type

    def _accelerator_state_init(self, *args, fsdp_plugin=None, **kwargs):
        accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    _prepare_backend._flexrank_cpu = True
    PartialState._prepare_backend = _prepare_backend
    AcceleratorState.__init__ = _accelerator_state_init
    return True


def backend_of(trainer) -> str:
    """The running backend's name (from the Trainer's flags: accelerate's distributed_type can be reset to
    MULTI_CPU by the CPU shims' state re-initialisation during training)."""
    if trainer.is_deepspeed_enabled:
        return f"zero{trainer.accelerator.state.deepspeed_plugin.zero_stage}"
    if trainer.is_fsdp_enabled:
        return "fsdp2"
    return "ddp" if trainer.args.world_size > 1 else "single"


def full_state_dict(trainer) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state dict, gathered from ZeRO-3 partitions or FSDP2 shards.
    A collective: every process must call it."""
    model = trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model
    state = trainer.accelerator.get_state_dict(model)
    return {k: _full(v) for k, v in (state or {}).items()}


@contextmanager
def zero3_init_as_configured(args):
    """Load the model with DeepSpeed's zero.Init only when the launch asked for it (zero3_init_flag).
    transformers turns zero.Init on for every from_pretrained once TrainingArguments carry a ZeRO-3 config,
    whatever accelerate's flag says; with it off, each process loads the model and the engine partitions it.
    Public APIs only: transformers' unset_hf_deepspeed_config, then the DeepSpeed plugin of `args` (TrainingArguments)
    sets its config again as TrainingArguments did (set_deepspeed_weakref)."""
    from transformers.integrations import unset_hf_deepspeed_config

    plugin = getattr(args, "deepspeed_plugin", None)
    wanted = os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false").lower() == "true"
    if plugin is None or wanted:
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


@contextmanager
def gathered(params: list[torch.Tensor]):
    """Full values of possibly sharded parameters (ZeRO-3 partitions, FSDP2 DTensors), read-only.
    A collective under ZeRO-3 and FSDP2: every process must enter it."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield [p.data for p in params]
    else:
        yield [_full(p) for p in params]


# Gathered weights may take at most this share of the memory free on the device (the rest: activations, the KV cache
# of generation and choice, logits).
GATHER_SHARE = 0.5


@contextmanager
def evaluation_parameters(model, gather="auto"):
    """One evaluation phase's parameters; yields whether each forward is a collective (sharded weights).

    Under ZeRO-3 / FSDP2, when `gather` is True, or "auto" and the full weights fit every process's device (by
    GATHER_SHARE, all processes agreeing), the full parameters are gathered once for the phase (a collective) and
    every forward is local: records stay sharded, generation needs no synced_gpus. Otherwise (and on any other
    backend) parameters stay as they are."""
    kind = _sharding(model)
    if kind is None:
        yield False
        return
    gathering = _gather_decision(model, kind, gather)
    if env.is_main_process():
        print(f"[flexrank] evaluation under {kind}: " + ("full parameters gathered once for the phase" if gathering
              else "parameters stay sharded (gathered per forward)") + f" (eval.gather_parameters: {gather})",
              flush=True)
    if not gathering:
        yield True
        return
    with (_zero3_gathered if kind == "zero3" else _fsdp2_unsharded)(model):
        yield False


def _sharding(model) -> str | None:
    """'zero3' or 'fsdp2' when the model's parameters are sharded across processes, else None."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return "zero3"
    return "fsdp2" if _fsdp2_modules(model) else None


def _fsdp2_modules(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _gather_decision(model, kind: str, gather) -> bool:
    """The recipe's switch, or 'auto': every process's free memory holds its missing parameters with the margin
    (decided together: one process gathering alone would leave the others waiting in a collective)."""
    if gather != "auto":
        return bool(gather)
    fits = missing_bytes(model.parameters(), kind) <= GATHER_SHARE * _free_memory(next(model.parameters()).device)
    import torch.distributed as dist

    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, fits)
    return all(everyone)


def missing_bytes(params, kind: str) -> int:
    """Bytes a process must add to hold the full parameters: each one's full size less its local shard."""
    missing = 0
    for p in params:
        if kind == "zero3":
            missing += (p.ds_numel - p.ds_tensor.numel()) * p.element_size()
        else:  # FSDP2: a DTensor's numel is the full tensor's
            local = p.to_local().numel() if hasattr(p, "to_local") else p.numel()
            missing += (p.numel() - local) * p.element_size()
    return missing


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


@contextmanager
def _zero3_gathered(model):
    """Every ZeRO-3 partition gathered once (public GatheredParameters), and DeepSpeed's per-module forward hooks
    set aside for the phase: with every parameter present they have nothing to fetch, yet they would partition
    each layer again after its forward, and the first forward after training spends tens of seconds in their
    trace bookkeeping (__params_to_release scans the whole trace for every module; seen in a profile)."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    params = [p for p in model.parameters() if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None), _hooks_set_aside(model, "deepspeed."):
        yield


@contextmanager
def _hooks_set_aside(model, package: str):
    """The forward (pre-)hooks of `package` removed from every module for the block, then put back in order."""
    saved = []
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            ours = [key for key, hook in hooks.items() if getattr(hook, "__module__", "").startswith(package)]
            if ours:
                saved.append((hooks, dict(hooks)))
                for key in ours:
                    del hooks[key]
    try:
        yield
    finally:
        for hooks, original in saved:
            hooks.clear()
            hooks.update(original)


@contextmanager
def _fsdp2_unsharded(model):
    """Every FSDP2 module unsharded once (public unshard, one collective each, in module order on every process)
    and kept so (set_reshard_after_forward(False), as torch documents for evaluation), then resharded with each
    group's reshard-after-forward setting as it was."""
    modules = _fsdp2_modules(model)
    groups = [g for m in modules for g in m._get_fsdp_state()._fsdp_param_groups]
    settings = [g.post_forward_mesh_info for g in groups]  # what set_reshard_after_forward writes
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
        for g, setting in zip(groups, settings):
            g.post_forward_mesh_info = setting


def full_values_and_grads(params: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(full value, full gradient) of each parameter, as the optimizer is about to see them: accumulated and
    averaged over processes, gathered from ZeRO partitions or FSDP2 shards. A collective on every backend but
    DDP: every process must call it with the same parameters in the same order."""
    if any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in params):  # ZeRO-3 / ZeRO-1,2 parameters
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

        return [(safe_get_full_fp32_param(p), safe_get_full_grad(p)) for p in params]
    return [(_full(p.detach()), None if p.grad is None else _full(p.grad)) for p in params]


def unwrap_optimizer(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer (and wrappers like it)."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def stepping_optimizers(trainer) -> list[torch.optim.Optimizer]:
    """The torch optimizers whose step() really updates the trained tensors, once training has begun (the Trainer's
    optimizer is only a client: accelerate wraps it, and under DeepSpeed ZeRO steps its own optimizer on fp32 master
    partitions, one param group at a time). With ZeRO offload_optimizer, accelerate (map_pytorch_optim_to_deepspeed)
    replaces the Trainer's optimizer by a new DeepSpeedCPUAdam built from its param groups unless the DeepSpeed
    config says `zero_force_ds_cpu_optimizer: false`, so hooks placed on the Trainer's optimizer would never run.
    Partial offload adds a `backup_optimizer` for the groups left on the accelerator."""
    if trainer.is_deepspeed_enabled:
        zero = trainer.model_wrapped.optimizer  # DeepSpeed's ZeRO / bf16 optimizer, around the stepping one
        found = [getattr(zero, "optimizer", zero), getattr(zero, "backup_optimizer", None)]
    else:
        found = [unwrap_optimizer(trainer.optimizer)]
    found = [o for o in found if isinstance(o, torch.optim.Optimizer)]
    if not found:
        raise RuntimeError(f"[flexrank] no torch optimizer found inside {type(trainer.optimizer).__name__} "
                           f"({backend_of(trainer)}): the rank controller's optimizer hooks cannot be attached")
    return found


def call_when_gradients_are_final(trainer, fn: Callable[[], None]) -> Callable[[], None]:
    """Once training has begun, run fn() once per optimizer step, when that step's gradients are final and
    readable, before the optimizer uses them. DeepSpeed fuses backward and step inside accelerate's engine wrapper
    (DeepSpeedEngineWrapper.backward calls engine.step()) and zeroes the gradients in its step, so there fn runs at
    the start of the engine's step (DeepSpeed has no public pre-step hook); elsewhere it is a pre-step hook of the
    stepping optimizer. Returns a function that undoes it."""
    if not trainer.is_deepspeed_enabled:
        handle = stepping_optimizers(trainer)[0].register_step_pre_hook(lambda *args: fn())
        return handle.remove
    engine = trainer.model_wrapped
    step = engine.step

    def step_after_fn(*a, **kw):
        fn()
        return step(*a, **kw)

    engine.step = step_after_fn
    return lambda: vars(engine).pop("step", None)


def link_zero12_optimizer_state(zero) -> None:
    """ZeRO-1/2 link each parameter to its slice of the Adam state lazily, once, at the first step, and then only
    for the parameter groups stepped so far (DeepSpeed 0.19: the params of later groups stay unlinked and
    safe_get/set_full_optimizer_state fail for them). Link again, now that every group has its state."""
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


# torch's multi-tensor ("foreach") operators, which torch.optim uses to update many small tensors in one call: a
# controller acting on every adapted module each step would otherwise issue a few operators per module.
FOREACH_OPS = ("_foreach_add_", "_foreach_sign", "_foreach_copy_")


def foreach_add_sign_(targets: list[torch.Tensor], values: list[torch.Tensor], alpha: float) -> None:
    """targets[i] += alpha · sign(values[i]), for every i at once."""
    torch._foreach_add_(targets, torch._foreach_sign(values), alpha=alpha)


def foreach_copy_(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """targets[i].copy_(sources[i]), for every i at once."""
    torch._foreach_copy_(targets, sources)


class _RecordingEngine:
    """Stands in for a DeepSpeed engine: records what accelerate's wrapper calls on it."""

    def __init__(self):
        self.calls = []

    def set_gradient_accumulation_boundary(self, is_boundary):
        pass

    def backward(self, loss, **kwargs):
        self.calls.append("backward")

    def step(self):
        self.calls.append("step")


def _wrapper_calls(wrapper_class) -> list[str]:
    """What one backward of accelerate's DeepSpeed engine wrapper calls on its engine (at a sync step)."""
    engine = _RecordingEngine()
    try:
        wrapper_class(engine).backward(torch.zeros(()), sync_gradients=True)
    except Exception as exc:  # a changed signature: reported by the caller as a changed behaviour
        return [f"{type(exc).__name__}: {exc}"]
    return engine.calls


def private_api_problems() -> list[str]:
    """One line per private or undocumented accelerate / DeepSpeed internal used above that is not as this module
    expects in the installed versions (empty when all are). Source checks are deliberate: these internals have no
    contract, so what is checked is exactly the behaviour relied on."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from deepspeed.utils import mixed_precision_linkage

    problems = []

    def source(obj) -> str:
        try:
            return inspect.getsource(obj)
        except (OSError, TypeError):  # replaced by something without a source file
            return ""

    def expect(dependency: str, holds: bool, what: str, used_by: str) -> None:
        if not holds:
            problems.append(f"{dependency} {version(dependency)}: {what} no longer holds (used by backends.{used_by})")

    expect("accelerate", list(inspect.signature(PartialState._prepare_backend).parameters)
           == ["self", "cpu", "sagemaker_dp", "backend"],
           "PartialState._prepare_backend(self, cpu, sagemaker_dp, backend) -> (backend, distributed_type)",
           "apply_cpu_shims")
    expect("accelerate", "fsdp_plugin" in inspect.signature(AcceleratorState.__init__).parameters,
           "AcceleratorState.__init__ takes fsdp_plugin and sets distributed_type", "apply_cpu_shims")
    expect("accelerate", _wrapper_calls(DeepSpeedEngineWrapper) == ["backward", "step"],
           "DeepSpeedEngineWrapper.backward at a sync step runs engine.backward then engine.step",
           "call_when_gradients_are_final")
    expect("deepspeed", callable(vars(DeepSpeedEngine).get("step")), "DeepSpeedEngine.step is the engine's step",
           "call_when_gradients_are_final")
    for cls in (DeepSpeedZeroOptimizer_Stage3, DeepSpeedZeroOptimizer):
        expect("deepspeed", "self.optimizer = init_optimizer" in source(cls.__init__),
               f"{cls.__name__}.optimizer is the optimizer ZeRO steps", "stepping_optimizers")
    expect("deepspeed", "self._hp_optimizer_states_linked = True" in source(
        getattr(DeepSpeedZeroOptimizer, "_lazy_init_hp_params_optimizer_state", None)),
        "DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state links params to their Adam state once",
        "link_zero12_optimizer_state")
    expect("deepspeed", "_hp_mapping" in source(mixed_precision_linkage),
           "ZeRO-1/2 parameters carry _hp_mapping", "full_values_and_grads")
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    expect("deepspeed", "module.register_forward_pre_hook(_pre_forward_module_hook)" in source(
        DeepSpeedZeRoOffload._register_deepspeed_module) and "self.module.register_forward_pre_hook(" in source(
        DeepSpeedZeRoOffload.setup_zero_stage3_hooks), "ZeRO-3's fetch/release run as forward hooks defined in "
        "deepspeed.runtime.zero.parameter_offload", "_zero3_gathered")
    expect("torch", all(isinstance(getattr(torch.nn.Linear(1, 1), a, None), dict)
                        for a in ("_forward_pre_hooks", "_forward_hooks")),
           "Module._forward_pre_hooks / _forward_hooks are the dicts forward calls", "_hooks_set_aside")
    expect("torch", "post_forward_mesh_info" in source(FSDPParamGroup.reshard) + source(FSDPParamGroup.__init__)
           and "_fsdp_param_groups" in source(FSDPState.__init__),
           "FSDP2 state._fsdp_param_groups[i].post_forward_mesh_info holds reshard_after_forward", "_fsdp2_unsharded")
    expect("torch", all(callable(getattr(torch, op, None)) for op in FOREACH_OPS),
           f"torch.{', torch.'.join(FOREACH_OPS)} are multi-tensor operators", "foreach_add_sign_, foreach_copy_")
    return problems
