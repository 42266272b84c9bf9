"""The one reader of the process environment a launcher (accelerate, torchrun, SLURM via accelerate) sets.

Usable before any process group exists: controllers, data caches and log filters need the rank and the world size
while the model is still loading.
"""

import os


def in_launched_process() -> bool:
    """True inside a process started by accelerate/torchrun (so flexrank must not re-launch itself)."""
    return "LOCAL_RANK" in os.environ


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return rank() == 0
