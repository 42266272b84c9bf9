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
    all-reduce, which every process must reach)."""
    if not (together and dist.is_available() and dist.is_initialized()):
        return _received[0]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([_received[0]], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


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
