"""Preemption and time limits: SIGTERM or SIGUSR1 (what SLURM sends with `--signal=B:USR1@120`, on preemption,
or on `scancel`) makes training stop at the next optimizer-step boundary with a complete checkpoint.

Every process only sets a flag when signalled; at each optimizer-step end all processes agree with one
all-reduce (a process that was not signalled still stops at the same step), the Trainer saves a normal
checkpoint and training ends. `run.train` then raises `Preempted`, so no metrics or adapter are written as if
the run had finished, and the process exits with PREEMPTED_EXIT. A second signal only sets the flag again: it
cannot interrupt the save (a SIGKILL still can, and then `--resume auto` passes over the incomplete checkpoint).
"""

import signal
import time

import torch
import torch.distributed as dist
from transformers import TrainerCallback

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later" - a checkpoint was saved, resume with --resume auto


class Preempted(Exception):
    """Training stopped on a signal after saving checkpoint-`step`."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint-{step} saved, "
                         "continue with --resume auto")
        self.step, self.signum = step, signum


class PreemptionCallback(TrainerCallback):
    """Catches SIGTERM/SIGUSR1 from construction on (a signal during model loading stops after the first step)."""

    def __init__(self):
        self.signum = 0  # the signal received, 0 while none
        self.stopped_at: int | None = None
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS}

    def _on_signal(self, signum, frame):
        if not self.signum:
            print(f"[flexrank] {signal.Signals(signum).name} received: saving a checkpoint at the end of this "
                  "optimizer step", flush=True)
        self.signum = self.signum or signum

    def restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _agreed_signal(self, device) -> int:
        """The signal any process got, the same answer on all of them (the step's one collective)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        agreed = self._agreed_signal(args.device)
        if agreed and state.global_step < state.max_steps:  # at the last step the run ends normally anyway
            self.signum, self.stopped_at, self._save_started = agreed, state.global_step, time.time()
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.stopped_at is not None and state.is_world_process_zero:
            print(f"[flexrank] checkpoint-{self.stopped_at} saved in {time.time() - self._save_started:.1f} s",
                  flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        self.restore_handlers()
