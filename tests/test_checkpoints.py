"""Checkpoint completion and rotation (checkpoints.py, FlexTrainer's on_save callback), and controller states that
load with torch.load(weights_only=True)."""

import torch
from elastic_helpers import ProgressionData, elastic_supernet
from transformers import LlamaForCausalLM, TrainingArguments

from conftest import tiny_llama_config
from flexrank.checkpoints import manifest as checkpoints
from flexrank.controllers import AdaLoRAController, SoRAController
from flexrank.training.trainer import STATE_FILE, FlexTrainer
from flexrank.adapters.rank_layer import rank_layers


def fake_checkpoint(run_dir, step, complete=True):
    folder = run_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"x" * step)
    if complete:
        checkpoints.mark_complete(folder, {"global_step": step})
    return folder


def remaining(run_dir):
    return sorted(int(p.name.split("-")[1]) for p in run_dir.iterdir())


def test_rotate_keeps_the_newest_complete_and_the_best(tmp_path):
    for step in (2, 4, 6, 8):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 10, complete=False)  # being written: never counts as one of the kept
    checkpoints.rotate(tmp_path, keep=2, protect=str(tmp_path / "checkpoint-2"))
    assert remaining(tmp_path) == [2, 6, 8, 10]
    checkpoints.rotate(tmp_path, keep=1, protect=None)
    assert remaining(tmp_path) == [8, 10]


def test_load_best_model_at_end_keeps_the_best_checkpoint(tmp_path):
    """save_total_limit 1 with load_best_model_at_end, the best checkpoint being the oldest (this tiny run's held-out
    loss rises: the lowest is the first): the newest and the best survive, both complete."""
    torch.manual_seed(0)
    model, controller = elastic_supernet(LlamaForCausalLM(tiny_llama_config()))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2,
                             eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                             save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="loss",
                             greater_is_better=False, report_to=[], use_cpu=True, seed=0, logging_steps=1)
    trainer = FlexTrainer(model=model, args=args, train_dataset=ProgressionData(), eval_dataset=ProgressionData(n=8),
                          controller=controller)
    trainer.train()
    assert not any(layer.guard_recompute for layer in controller.layers.values())  # no checkpointing: no check
    evals = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    best = min(evals, key=evals.get)
    assert best == 2, evals  # premise: the best checkpoint is the oldest one
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    assert remaining(tmp_path) == [2, 6]
    for step in (2, 6):
        assert checkpoints.problem(tmp_path / f"checkpoint-{step}") is None
        assert (tmp_path / f"checkpoint-{step}" / STATE_FILE).is_file()
    # The Trainer's own rotation stays off (it would run before the manifest is written).
    assert trainer.args.save_total_limit is None


def _round_trip(controller, path):
    torch.save(controller.state_dict(), path)
    return torch.load(path, weights_only=True)


def test_controller_states_load_weights_only(tmp_path, tiny_llama, batch):
    # Elastic: seed and active config.
    model, elastic = elastic_supernet(tiny_llama)
    elastic.before_pass(5, 0)
    state = _round_trip(elastic, tmp_path / "elastic.pt")
    assert state == elastic.state_dict()
    layers = rank_layers(model)
    # SoRA: its step.
    sora = SoRAController(layers, sparse_lambda=0.1, threshold=0.01)
    sora.before_pass(3, 0)
    assert _round_trip(sora, tmp_path / "sora.pt") == {"step": 3}
    # AdaLoRA: importance EMAs (tensors) and masks after a real step's gradients.
    adalora = AdaLoRAController(layers, target_r=2, total_step=10, tinit=0, tfinal=2)
    model(**batch).loss.backward()
    adalora.before_pass(3, 0)
    adalora.on_final_gradients()
    state = _round_trip(adalora, tmp_path / "adalora.pt")
    assert state["budget"] < adalora.init_budget and state["exp_avg_ipt"]
    for key, value in adalora.state_dict()["exp_avg_ipt"].items():
        torch.testing.assert_close(state["exp_avg_ipt"][key], value)
    fresh = AdaLoRAController(layers, target_r=2, total_step=10, tinit=0, tfinal=2)
    fresh.load_state_dict(state)
    assert fresh.budget == adalora.budget and fresh.active_rank() == adalora.active_rank()
