"""Preemption and time limits: SIGTERM or SIGUSR1 (what SLURM sends with `--signal=B:USR1@120`, on preemption,
or on `scancel`) makes training stop at the next optimizer-step boundary with a complete checkpoint, and an
evaluation stop at its next batch.

Every process only sets a flag when signalled. At each optimizer-step end all processes agree with one
all-reduce (a process that was not signalled still stops at the same step), the Trainer saves a normal
checkpoint and training ends; `run.train` then raises `Preempted`, so no metrics or adapter are written as if the
run had finished, and the process exits with PREEMPTED_EXIT. Evaluation checks before each batch
(evaluation/scoring.py): processes whose forwards are collectives run the same number of batches and agree at each
one; with local forwards each stops at its next batch and they agree once after the loop, where all arrive. Either
way no process is left waiting in a collective. A second signal only sets the flag again: it cannot interrupt a save (a SIGKILL
still can, and then `--resume auto` passes over the incomplete checkpoint).
"""

import signal
import time

import torch
import torch.distributed as dist
from transformers import TrainerCallback

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later" - what can be resumed was saved; resubmit with --resume auto
PREEMPTED_MARK = ".flexrank_preempted"  # written in the run folder by a process that stopped on a signal
_received = [0]  # the signal this process got (0: none), set by the handlers catch_signals() installs


class Preempted(Exception):
    """A run, evaluation or search stopped on a signal; `kept` says what the requeued job continues from."""

    def __init__(self, signum: int, kept: str):
        super().__init__(f"stopped by {signal.Signals(signum).name} {kept}")
        self.signum = signum


def catch_signals(announce: str = "stopping at the next optimizer step or evaluation batch"):
    """From now on SIGTERM/SIGUSR1 only set this process's flag (announced once); returns a function that puts
    the previous handlers back."""
    def on_signal(signum, frame):
        if not _received[0]:
            print(f"[flexrank] {signal.Signals(signum).name} received: {announce}", flush=True)
        _received[0] = _received[0] or signum

    _received[0] = 0
    previous = {sig: signal.signal(sig, on_signal) for sig in SIGNALS}
    return lambda: [signal.signal(sig, handler) for sig, handler in previous.items()]


def agreed_signal(together: bool) -> int:
    """The signal any process got; with `together`, the same answer on every process of the group (one
    all-reduce, which every process must reach).

    It runs at every optimizer step, so it never touches the GPU: the flag is a host tensor, all-reduced over gloo
    (the default group where its backend takes CPU tensors, else a gloo group over the same processes). An
    all-reduce of a CUDA tensor through NCCL would need a host-to-device copy and a read back, each waiting until
    the GPU has finished all the work queued before it; the gloo all-reduce only waits for the other processes'
    hosts (tens of microseconds on one node)."""
    if not (together and dist.is_available() and dist.is_initialized()):
        return _received[0]
    flag = torch.tensor([_received[0]], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_host_group())
    return int(flag.item())  # a host tensor: no wait for the device


_HOST_GROUP: list = [None, None]  # [the default group it was made for, a gloo group over the same processes]


def _host_group():
    """A process group that all-reduces host tensors. A gloo group is made once, at the first agreement, which every
    process reaches (new_group is a collective); made again if the default group was re-created."""
    world = dist.group.WORLD
    if "gloo" in str(dist.get_backend()):  # "gloo", or a pair such as "cpu:gloo,cuda:nccl"
        return world
    if _HOST_GROUP[0] is not world:
        _HOST_GROUP[:] = [world, dist.new_group(backend="gloo")]
    return _HOST_GROUP[1]


class PreemptionCallback(TrainerCallback):
    """Stops training at the optimizer-step boundary after a signal (caught from construction on: a signal during
    model loading or the first evaluation stops there instead)."""

    def __init__(self):
        self.stopped_at: int | None = None
        self.restore_handlers = catch_signals()

    @property
    def signum(self) -> int:
        return _received[0]

    def on_step_end(self, args, state, control, **kwargs):
        agreed = agreed_signal(together=True)
        if agreed and state.global_step < state.max_steps:  # at the last step the run ends normally anyway
            _received[0], self.stopped_at, self._save_started = agreed, state.global_step, time.time()
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.stopped_at is not None and state.is_world_process_zero:
            print(f"[flexrank] checkpoint-{self.stopped_at} saved in {time.time() - self._save_started:.1f} s",
                  flush=True)
