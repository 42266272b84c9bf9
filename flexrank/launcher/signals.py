"""Running the `accelerate launch` child so that SIGTERM/SIGUSR1 sent to `flexrank train` reach the training
processes, which then checkpoint at a step boundary and stop (flexrank/checkpoints/preemption.py).

The signal goes to the workers themselves, not to accelerate's torchrun agent: torchrun starts each worker in
a session of its own (so a signal to our process group misses them), treats SIGTERM as "kill the workers, SIGKILL
after 30 s" and dies of SIGUSR1. The agent is started with SIGUSR1 ignored for that reason; the workers inherit
"ignored" and install their own handler.
"""

import signal
import subprocess
import time
from pathlib import Path

import psutil

from ..checkpoints import manifest as checkpoints
from ..checkpoints.preemption import PREEMPTED_EXIT, SIGNALS


def _workers(agent: int) -> list[psutil.Process]:
    """The agent's direct children: the training processes (not what they start, e.g. data-loader workers)."""
    try:
        return psutil.Process(agent).children()
    except psutil.NoSuchProcess:
        return []


def _saved_since(run_dir: Path, since: float) -> Path | None:
    """The newest complete checkpoint, if it was completed after `since`."""
    newest = checkpoints.latest_complete(run_dir, warn=lambda *_: None, set_aside=False)
    if newest is not None and (newest / checkpoints.MANIFEST).stat().st_mtime >= since:
        return newest
    return None


def run_forwarding_signals(cmd: list[str], env: dict[str, str], run_dir: Path) -> int:
    """Run the launcher child; forward SIGTERM/SIGUSR1 to its workers. Returns the child's exit status, or
    PREEMPTED_EXIT when a forwarded signal ended the run with a new complete checkpoint in run_dir."""
    received: list[float] = []
    previous_usr1 = signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # inherited by the child: see above
    try:
        child = subprocess.Popen(cmd, env=env)
    finally:
        signal.signal(signal.SIGUSR1, previous_usr1)

    def forward(signum, frame):
        received.append(time.time())
        workers = _workers(child.pid)
        print(f"[flexrank] forwarding {signal.Signals(signum).name} to {len(workers)} training process(es)",
              flush=True)
        if not workers:  # not started yet: nothing to save, stop the launch
            child.terminate()
        for proc in workers:
            try:
                proc.send_signal(signal.SIGUSR1)  # each worker handles it the same way as SIGTERM
            except psutil.NoSuchProcess:
                pass

    previous = {sig: signal.signal(sig, forward) for sig in SIGNALS}
    try:
        returncode = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received and returncode != 0 and (saved := _saved_since(run_dir, received[0])):
        print(f"[flexrank] preempted: {saved} saved; continue with --resume auto", flush=True)
        return PREEMPTED_EXIT
    return returncode
