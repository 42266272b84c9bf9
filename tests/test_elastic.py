"""Elastic supernet training: one subnet per optimizer step, from (seed, step) alone, identical on every
process, micro-batch and gradient-checkpoint recomputation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_helpers import free_port
from elastic_helpers import elastic_supernet

SCRIPT = Path(__file__).parent / "scripts" / "elastic_train.py"


def test_masks_follow_the_sampled_config(tiny_llama):
    model, ctrl = elastic_supernet(tiny_llama)
    seen = set()
    for step in range(12):
        ctrl.before_pass(step, 0)
        expected = ctrl.space.config_for_step(7, step, 100)
        assert ctrl.config == expected
        widths = ctrl.space.module_widths(expected)
        for name, layer in ctrl.layers.items():
            mask = layer.lora_rank_mask["default"]
            width = widths.get(name, 8)  # o_proj / gate_proj are in no group: full rank
            assert mask[:width].eq(1).all() and mask[width:].eq(0).all()
        seen.add(tuple(expected.values()))
    assert len(seen) > 1
    assert ctrl.active_rank() == sum(ctrl.space.module_widths(ctrl.config).values()) + 8 * 4  # 2 layers x (o, gate)


def test_sandwich_rule_runs_max_min_random(tiny_llama):
    _, ctrl = elastic_supernet(tiny_llama, sandwich=True)
    assert ctrl.passes(3) == 3
    ctrl.before_pass(3, 0)
    assert ctrl.config == ctrl.space.maximal()
    ctrl.before_pass(3, 1)
    assert ctrl.config == ctrl.space.minimal()
    ctrl.before_pass(3, 2)
    assert ctrl.config == ctrl.space.config_for_step(7, 3, 100)


def test_state_dict_round_trip(tiny_llama):
    _, ctrl = elastic_supernet(tiny_llama)
    ctrl.activate("heuristic")
    state = ctrl.state_dict()
    ctrl.activate("minimal")
    ctrl.load_state_dict(state)
    assert ctrl.config == ctrl.space.heuristic()


def _launch(out: Path, nproc: int) -> list[dict]:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT), str(out)]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(SCRIPT), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def test_one_subnet_per_step_on_every_process_and_micro_batch(tmp_path):
    """2 processes (gloo DDP), gradient accumulation 2, gradient checkpointing: every process and every
    micro-batch of a step trains the same subnet, which is the pure function of (seed, step)."""
    ranks = _launch(tmp_path, 2)
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["records"] == ranks[1]["records"]
    by_step: dict[int, list] = {}
    for rec in ranks[0]["records"]:
        by_step.setdefault(rec["step"], []).append((rec["config"], rec["masks"]))
    assert sorted(by_step) == list(range(6))
    for step, passes in by_step.items():
        assert len(passes) == 2  # two micro-batches
        assert passes[0] == passes[1]
    assert len({json.dumps(p[0][0]) for p in by_step.values()}) > 1  # the subnet does change between steps
    assert len(ranks[0]["losses"]) == 6


def test_single_process_samples_the_same_subnets(tmp_path, tiny_llama):
    single = _launch(tmp_path, 1)[0]
    _, ctrl = elastic_supernet(tiny_llama)
    for rec in single["records"]:
        assert rec["config"] == ctrl.space.config_for_step(7, rec["step"], ctrl.steps_per_epoch)
