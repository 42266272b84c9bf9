"""Running `flexrank train` as a user would (CLI; several processes through accelerate launch, gloo on CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from flexrank.launcher.launch import free_port  # noqa: F401  (re-exported for the tests)

ROOT = Path(__file__).resolve().parents[1]


ELASTIC = {"method": "elastic", "r": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
           "elastic": {"search_space": {"groups": [["q_proj", "k_proj", "v_proj"], ["up_proj"], ["down_proj"]],
                                        "widths": [8, 6, 4]}, "evaluate_subnets": []}}


def recipe(tmp: Path, model_dir: Path, method: str = "lora", **training) -> Path:
    adapter = {
        "lora": {"method": "lora", "r": 4},
        "elastic": ELASTIC,
        # In-place distillation from the maximal subnet (a second, no-grad forward per micro-batch).
        "elastic_distill": {**ELASTIC, "elastic": {**ELASTIC["elastic"],
                                                   "distill": {"weight": 0.5, "temperature": 2.0}}},
        # Thresholds large enough that some (normally initialised) gates reach exact zeros within 6 steps.
        "sora": {"method": "sora", "r": 4, "sora": {"sparse_lambda": 0.1, "threshold": 0.05, "gate_init": "normal",
                                                    "schedule": {"dense_steps": 2}}},
        "adalora": {"method": "adalora", "r": 4, "lora_alpha": 8,
                    "adalora": {"target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1}},
    }[method]
    raw = {"model": {"name_or_path": str(model_dir)},
           "data": {"task": "analogy", "train_size": 64, "eval_size": 8},
           "adapter": adapter, "eval": {"before": False, "after": False},
           "training": {"learning_rate": 1e-2, "per_device_train_batch_size": 4, "max_steps": 6, "logging_steps": 1,
                        "warmup_steps": 0, "report_to": [], "seed": 0, **training}}
    path = tmp / f"{method}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def zero3_test_config(tmp: Path) -> Path:
    """ZeRO-3 with stage3_param_persistence_threshold 0, so that even tiny LoRA tensors are partitioned."""
    cfg = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp / "zero3_t0.json"
    path.write_text(json.dumps(cfg))
    return path


def train_args(recipe_path: Path, out: Path, backend: str, *extra: str, match_two_processes: bool = True) -> list[str]:
    args = [sys.executable, "-m", "flexrank", "train", str(recipe_path), "--set", f"training.output_dir={out}"]
    if backend == "single":
        if match_two_processes:
            args += ["--set", "training.gradient_accumulation_steps=2"]  # same global batch as 2 processes x 1
    else:
        args += ["--nproc", "2", "--backend", backend, "--main-process-port", str(free_port())]
        if backend == "zero3":
            args += ["--set", f"distributed.deepspeed_config={zero3_test_config(out.parent)}"]
    return args + list(extra)


def run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path, atol: float = 5e-5) -> None:
    """Same keys and shapes, values within atol: Adam turns reduction-order noise (1e-7) in near-zero gradients
    into update differences of up to ~2e-5 after a few steps at lr 1e-2 (seen under ZeRO-3)."""
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].shape == tb[key].shape, key  # gathered: full shapes, never ZeRO-3 / FSDP2 shards
        torch.testing.assert_close(ta[key], tb[key], rtol=0, atol=atol, msg=key)
