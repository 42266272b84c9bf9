"""Elastic supernet training: one subnet per optimizer step, from (seed, step) alone, identical on every
process, micro-batch and gradient-checkpoint recomputation."""

import copy
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


GROUPS = ["L0:q_proj+k_proj+v_proj", "L1:q_proj+k_proj+v_proj", "L0:up_proj", "L1:up_proj", "L0:down_proj",
          "L1:down_proj"]  # the tiny Llama's 2 layers x SHEARS_SPEC's groups, written out
MAXIMAL, MINIMAL = dict.fromkeys(GROUPS, 8), dict.fromkeys(GROUPS, 4)


def _group_of(module: str) -> str | None:
    """The group a module belongs to, by hand: q/k/v of a layer together, up and down alone, o/gate in none."""
    layer = module.split(".layers.")[1].split(".")[0]
    proj = module.rsplit(".", 1)[1]
    short = {"q_proj": "q_proj+k_proj+v_proj", "k_proj": "q_proj+k_proj+v_proj", "v_proj": "q_proj+k_proj+v_proj",
             "up_proj": "up_proj", "down_proj": "down_proj"}.get(proj)
    return f"L{layer}:{short}" if short else None


def test_masks_follow_the_sampled_config(tiny_llama):
    model, ctrl = elastic_supernet(tiny_llama)
    _, again = elastic_supernet(copy.deepcopy(tiny_llama))  # another process: same seed, no communication
    _, other_seed = elastic_supernet(copy.deepcopy(tiny_llama), seed=8)
    configs, others = [], []
    for step in range(12):
        ctrl.before_pass(step, 0)
        again.before_pass(step, 0)
        other_seed.before_pass(step, 0)
        assert sorted(ctrl.config) == sorted(GROUPS) and set(ctrl.config.values()) <= {8, 6, 4}
        assert again.config == ctrl.config
        for name, layer in ctrl.layers.items():
            mask = layer.lora_rank_mask["default"]
            group = _group_of(name)
            width = ctrl.config[group] if group else 8  # o_proj / gate_proj are in no group: full rank
            assert mask[:width].eq(1).all() and mask[width:].eq(0).all(), name
        configs.append(dict(ctrl.config))
        others.append(dict(other_seed.config))
    assert {w for c in configs for w in c.values()} == {8, 6, 4}  # every width is drawn
    assert len({tuple(c.values()) for c in configs}) > 6  # and the subnet changes from step to step
    assert others != configs  # the seed matters
    # q, k, v count three times per layer; o_proj and gate_proj keep all 8 ranks.
    last = configs[-1]
    assert ctrl.active_rank() == sum(3 * last[f"L{i}:q_proj+k_proj+v_proj"] + last[f"L{i}:up_proj"]
                                     + last[f"L{i}:down_proj"] + 2 * 8 for i in (0, 1))


def test_sandwich_rule_runs_max_min_random(tiny_llama):
    _, ctrl = elastic_supernet(tiny_llama, sandwich=True)
    _, plain = elastic_supernet(copy.deepcopy(tiny_llama))  # the sampler without the sandwich rule
    assert ctrl.passes(3) == 3 and plain.passes(3) == 1
    randoms = []
    for step in range(6):
        ctrl.before_pass(step, 0)
        assert ctrl.config == MAXIMAL and ctrl.active_rank() == 8 * 14
        ctrl.before_pass(step, 1)
        assert ctrl.config == MINIMAL and ctrl.active_rank() == 4 * 10 + 8 * 4
        ctrl.before_pass(step, 2)
        plain.before_pass(step, 0)
        assert ctrl.config == plain.config  # the third pass is the step's ordinary sample
        randoms.append(tuple(ctrl.config.values()))
    assert len(set(randoms)) > 1 and ctrl.history[5] == plain.config


# A subnet that is none of the named ones (every rank width and, with base widths, two MLP widths).
SAVED = {"L0:q_proj+k_proj+v_proj": 6, "L1:q_proj+k_proj+v_proj": 4, "L0:up_proj": 8, "L1:up_proj": 6,
         "L0:down_proj": 4, "L1:down_proj": 8}
SAVED_MLP = {"L0:mlp": 96, "L1:mlp": 64}  # of the intermediate 128, widths [1.0, 0.75, 0.5]


@pytest.mark.parametrize("base_widths", [None, {"mlp": [1.0, 0.75, 0.5]}], ids=["ranks", "base_widths"])
def test_state_dict_round_trip(tiny_llama, tmp_path, base_widths):
    """A controller saved as the trainer saves it (torch.save of state_dict) and loaded into a fresh one (built
    with another seed, at the maximal subnet, as on resume): the same config, rank masks, base masks, recorded
    losses and seed, hence the same logits and the same subnets sampled at the following steps. Every expected
    value is taken before saving or written by hand, never from the loaded controller."""
    model, ctrl = elastic_supernet(tiny_llama, base_widths=base_widths)
    with torch.no_grad():  # lora_B starts at zero, where rank masks would not change the logits
        g = torch.Generator().manual_seed(3)
        for layer in ctrl.layers.values():
            layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=g))
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    for step in range(3):  # three optimizer steps: sampled subnets and their (2 micro-batch) losses
        ctrl.before_pass(step, 0)
        ctrl.record_loss(step, [torch.tensor(1.0 + step)])
        ctrl.record_loss(step, [torch.tensor(0.5)])
        ctrl.after_optimizer_step(step)
    saved = {**SAVED, **SAVED_MLP} if base_widths else SAVED
    ctrl.activate(saved)

    # What the saved subnet is, by hand, and what the model computes with it.
    widths = {name: saved[_group_of(name)] if _group_of(name) else 8 for name in ctrl.layers}
    assert len(widths) == 14 and sorted(set(widths.values())) == [4, 6, 8]
    masks_at_save = {name: layer.lora_rank_mask["default"].clone() for name, layer in ctrl.layers.items()}
    for name, mask in masks_at_save.items():
        assert mask.tolist() == [1.0] * widths[name] + [0.0] * (8 - widths[name]), name
    base_at_save = dict(ctrl.base_masks.widths) if base_widths else None
    if base_widths:
        assert base_at_save == {f"base_model.model.model.layers.{i}.mlp.down_proj": w for i, w in ((0, 96), (1, 64))}
    with torch.no_grad():
        logits_at_save = model(ids).logits
    torch.save(ctrl.state_dict(), tmp_path / "controller.pt")

    # Resume: a fresh controller on the same layers (and base masks) at the maximal subnet, with another seed.
    fresh = type(ctrl)(ctrl.layers, ctrl.space, seed=99, steps_per_epoch=100, base_masks=ctrl.base_masks)
    assert all(layer.lora_rank_mask["default"].eq(1).all() for layer in fresh.layers.values())
    with torch.no_grad():
        assert (model(ids).logits - logits_at_save).abs().max() > 1e-3  # the saved subnet is another model
    fresh.load_state_dict(torch.load(tmp_path / "controller.pt", weights_only=True))

    assert fresh.config == saved and fresh.seed == 7
    assert fresh.step_losses() == {0: 1.5, 1: 2.5, 2: 3.5}  # the sampled subnets' losses, summed per step
    for name, layer in fresh.layers.items():
        assert torch.equal(layer.lora_rank_mask["default"], masks_at_save[name]), name
    if base_widths:
        assert fresh.base_masks.widths == base_at_save
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits_at_save, rtol=0, atol=0)
    # The history is not saved (sampling is a pure function of seed and step): the loaded controller samples the
    # subnets the saved one samples at the next steps.
    for step in range(3, 8):
        ctrl.before_pass(step, 0)
        fresh.before_pass(step, 0)
    assert [ctrl.history[s] for s in range(3, 8)] == [fresh.history[s] for s in range(3, 8)]
    assert len({json.dumps(fresh.history[s]) for s in range(3, 8)}) > 1


def _launch(out: Path, nproc: int) -> list[dict]:
    out.mkdir(exist_ok=True)
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
    micro-batch of a step trains the same subnet, and one process alone trains the same ones."""
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
    # One process (gradient accumulation 2) samples, per step and micro-batch, what the two processes sampled.
    single = _launch(tmp_path / "single", 1)[0]
    assert single["world_size"] == 1 and single["records"] == ranks[0]["records"]


def test_sandwich_rule_in_a_training_run(tiny_llama, tmp_path):
    """FlexTrainer with sandwich: true, gradient accumulation 2 and gradient checkpointing: every micro-batch of
    every optimizer step runs three forward+backward passes, maximal, minimal and the step's sampled subnet,
    and each backward (the checkpoint recomputation) runs with its own pass's subnet."""
    from elastic_helpers import ProgressionData
    from transformers import TrainingArguments

    from flexrank.training.trainer import FlexTrainer

    model, ctrl = elastic_supernet(tiny_llama, sandwich=True)
    _, plain = elastic_supernet(copy.deepcopy(tiny_llama))  # what the third pass must be
    probe = ctrl.layers["base_model.model.model.layers.1.mlp.up_proj"]
    weights, widths = probe.rank_weights, []
    probe.rank_weights = lambda a: widths.append(int(probe.lora_rank_mask[a].sum())) or weights(a)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=3, learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, seed=0, gradient_checkpointing=True,
                             gradient_checkpointing_kwargs={"use_reentrant": False})
    FlexTrainer(model=model, args=args, train_dataset=ProgressionData(), controller=ctrl).train()

    passes = [(r["step"], r["pass"], r["config"]) for r in ctrl.records]
    expected = []
    for step in range(3):
        plain.before_pass(step, 0)
        for _micro_batch in range(2):
            expected += [(step, 0, MAXIMAL), (step, 1, MINIMAL), (step, 2, dict(plain.config))]
    assert passes == expected
    assert all(layer.guard_recompute for layer in ctrl.layers.values())  # checkpointing: the mask check is on
    # Each pass: a forward and its recomputation in backward, with the pass's width for L1 up_proj.
    assert widths == [w for _, _, c in expected for w in (c["L1:up_proj"],) * 2]
    # The maximal pass trains every rank of every module: all of A changed (B starts at zero, as in peft).
    for name, layer in ctrl.layers.items():
        a = f"{name}.lora_A.default.weight"
        assert (model.get_parameter(a) != before[a]).all(dim=1).all(), name
