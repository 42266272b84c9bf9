"""Running the `accelerate launch` child so that SIGTERM/SIGUSR1 sent to `flexrank train` or `search` reach the
worker processes, which then checkpoint at a step boundary or stop at an evaluation batch and exit
(flexrank/checkpoints/preemption.py).

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

from ..checkpoints.preemption import PREEMPTED_EXIT, PREEMPTED_MARK, SIGNALS


def _workers(agent: int) -> list[psutil.Process]:
    """The agent's direct children: the training processes (not what they start, e.g. data-loader workers)."""
    try:
        return psutil.Process(agent).children()
    except psutil.NoSuchProcess:
        return []


def _preempted_since(run_dir: Path, since: float) -> str | None:
    """What the workers said they kept when they stopped on the signal (their mark in the run folder), if they
    did after `since`."""
    mark = run_dir / PREEMPTED_MARK
    if mark.is_file() and mark.stat().st_mtime >= since:
        return mark.read_text().strip()
    return None


def run_forwarding_signals(cmd: list[str], env: dict[str, str], run_dir: Path) -> int:
    """Run the launcher child; forward SIGTERM/SIGUSR1 to its workers. Returns the child's exit status, or
    PREEMPTED_EXIT when the workers stopped on a forwarded signal (after saving what can be resumed)."""
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
    if received and returncode != 0 and (said := _preempted_since(run_dir, received[0])):
        print(f"[flexrank] preempted: {said}", flush=True)
        return PREEMPTED_EXIT
    return returncode
