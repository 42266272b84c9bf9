"""Building the `accelerate launch` command with which `flexrank train` re-runs itself on several processes.

Backends: single, ddp, fsdp2, zero2, zero3, zero3_offload (their accelerate_configs/ and ds_configs/ files ship
inside the package, see shipped.py).
"""

import os
import shlex
import socket
import sys
from pathlib import Path

import torch

from ..shipped import ACCELERATE_CONFIGS, DS_CONFIGS, shipped_file

_ACCELERATE_FILES = {"single": "single.yaml", "ddp": "ddp.yaml", "fsdp2": "fsdp2.yaml",
                     "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml",
                     "zero3_offload": "deepspeed_zero3_offload.yaml"}
_DS_FILES = {"zero2": "zero2.json", "zero3": "zero3.json", "zero3_offload": "zero3_offload.json"}


def free_port() -> int:
    """A port nobody listens on now, so that several launches on one machine never share a rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(dist, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The `accelerate launch` command (and extra environment) that re-runs `flexrank <argv>` on dist.nproc
    processes per node; flexrank prints it before running it."""
    backend = dist.backend
    yaml_file = Path(backend) if backend.endswith((".yaml", ".yml")) else shipped_file(
        ACCELERATE_CONFIGS, _ACCELERATE_FILES[backend])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(yaml_file),
           "--num_processes", str(dist.nproc * dist.nnodes), "--num_machines", str(dist.nnodes),
           "--machine_rank", str(dist.node_rank), "--main_process_port", str(dist.main_process_port)]
    if dist.nnodes > 1:
        cmd += ["--main_process_ip", dist.main_process_ip]
    if backend in _DS_FILES or dist.deepspeed_config:
        ds = Path(dist.deepspeed_config) if dist.deepspeed_config else shipped_file(DS_CONFIGS, _DS_FILES[backend])
        cmd += ["--deepspeed_config_file", str(ds.resolve()), "--zero3_init_flag", "false"]
    env = {} if torch.cuda.is_available() else {"DS_ACCELERATOR": "cpu"}
    return cmd + ["-m", "flexrank"] + argv, env


def format_command(cmd: list[str], env: dict[str, str]) -> str:
    return " ".join([f"{k}={v}" for k, v in env.items()] + [shlex.quote(c) for c in cmd])


def exit_distributed(status: int = 0) -> None:
    """Tear down and leave at once: distributed CPU processes sometimes abort in interpreter teardown after
    finishing, which fails the whole launch (reference: distributed.md §5)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
