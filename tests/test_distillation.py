"""In-place distillation of the elastic supernet (adapter.elastic.distill): a sampled subnet other than the maximal
one learns (1 - w) x CE + w x T^2 x KL(maximal || subnet) over the labelled tokens of the same batch, normalised
as the Trainer normalises the CE; the maximal subnet learns CE only, with no teacher forward. Every expected value
is computed here, with torch.nn.functional, from forwards made here with the masks set by hand."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from elastic_helpers import ProgressionData, elastic_supernet
from transformers import TrainingArguments

from flexrank.config import load_config
from flexrank.elastic.distillation import Distillation
from flexrank.training.trainer import FlexTrainer

W, T = 0.3, 2.0
BASE_WIDTHS = {"mlp": [1.0, 0.75, 0.5]}
SEED = 7  # elastic_supernet's sampling seed


def _supernet(tiny_llama, tmp_path, base_widths=None, sandwich=False, **args):
    model, ctrl = elastic_supernet(tiny_llama, seed=SEED, base_widths=base_widths, sandwich=sandwich,
                                   distill=Distillation(weight=W, temperature=T))
    with torch.no_grad():  # lora_B starts at zero, where the rank masks would not change the logits
        g = torch.Generator().manual_seed(3)
        for layer in ctrl.layers.values():
            weight = layer.lora_B["default"].weight
            weight.copy_(torch.randn(weight.shape, generator=g) * 0.5)
    trainer = FlexTrainer(model=model, controller=ctrl,
                          args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[], seed=0, **args))
    return model, ctrl, trainer


def _batch():
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt without loss
    labels[1, 9:] = -100
    return {"input_ids": ids, "labels": labels}


def _forward_counter(model) -> list:
    calls = []
    model.get_input_embeddings().register_forward_hook(lambda *_: calls.append(1))
    return calls


def _hand(model, ctrl, batch, subnet, items, teacher="maximal"):
    """(CE of `subnet`, T^2 x KL(teacher || subnet)), each summed over the labelled tokens (label t+1 scores the
    logits at t) and divided by `items`, from two forwards with the masks set here; the CE keeps its graph."""
    ctrl.activate(teacher)
    with torch.no_grad():
        teacher_logits = model(input_ids=batch["input_ids"]).logits[:, :-1].reshape(-1, 1000)
    ctrl.activate(subnet)
    student = model(input_ids=batch["input_ids"]).logits[:, :-1].reshape(-1, 1000)
    targets = batch["labels"][:, 1:].reshape(-1)
    ce = F.cross_entropy(student, targets, ignore_index=-100, reduction="sum") / items
    kl = F.kl_div(F.log_softmax(student / T, -1), F.log_softmax(teacher_logits / T, -1), log_target=True,
                  reduction="none").sum(-1)
    return ce, (kl * targets.ne(-100)).sum() * T * T / items


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("base_widths", [None, BASE_WIDTHS], ids=["ranks", "base_widths"])
def test_a_sampled_subnet_learns_its_labels_and_the_maximal_subnets_output(tiny_llama, tmp_path, base_widths):
    model, ctrl, trainer = _supernet(tiny_llama, tmp_path, base_widths)
    batch, step = _batch(), 0
    sampled = ctrl.space.config_for_step(SEED, step, 100)
    assert sampled != ctrl.space.maximal()
    # The step's labelled tokens as the Trainer counts them (every micro-batch and process): 7 more than here.
    items = torch.tensor(int(batch["labels"][:, 1:].ne(-100).sum()) + 7)
    forwards, teachers, teacher_logits = _forward_counter(model), [], ctrl.teacher_logits
    ctrl.teacher_logits = lambda forward: teachers.append(teacher_logits(forward)) or teachers[-1]
    loss = trainer.training_step(model, dict(batch), num_items_in_batch=items)
    assert len(forwards) == 2  # the teacher's forward and the subnet's
    assert len(teachers) == 1 and not teachers[0].requires_grad  # the teacher's forward keeps no graph
    trained = _grads(model)

    ce, kd = _hand(model, ctrl, batch, sampled, items)
    expected = (1 - W) * ce + W * kd
    assert kd.item() > 0.05  # the maximal subnet is another model than the sampled one
    torch.testing.assert_close(loss, expected.detach())
    expected.backward()  # the same gradients: the teacher's logits are a constant
    by_hand = _grads(model)
    assert trained.keys() == by_hand.keys() and len(trained) > 0
    for name, grad in trained.items():
        torch.testing.assert_close(grad, by_hand[name], msg=name)

    ctrl.after_optimizer_step(step)
    assert ctrl.step_losses()[step] == pytest.approx(float(ce))  # the search ranks subnets by their labels' loss
    metrics = ctrl.log_metrics()
    assert metrics["elastic/distill_loss"] == pytest.approx(float(kd))
    assert "elastic/distill_loss" not in ctrl.log_metrics()  # read once, on the logging step


def test_the_maximal_subnet_learns_its_labels_only_with_no_teacher_forward(tiny_llama, tmp_path):
    model, ctrl, trainer = _supernet(tiny_llama, tmp_path)
    step = next(s for s in itertools.count() if ctrl.space.config_for_step(SEED, s, 100) == ctrl.space.maximal())
    trainer.state.global_step = step
    batch, items = _batch(), torch.tensor(30)
    forwards = _forward_counter(model)
    loss = trainer.training_step(model, dict(batch), num_items_in_batch=items)
    assert ctrl.history[step] == ctrl.space.maximal() and len(forwards) == 1
    ce, _ = _hand(model, ctrl, batch, "maximal", items)
    torch.testing.assert_close(loss, ce.detach())
    ctrl.after_optimizer_step(step)
    assert ctrl.step_losses()[step] == pytest.approx(float(ce))
    assert "elastic/distill_loss" not in ctrl.log_metrics()


def test_sandwich_passes_learn_from_the_maximal_pass_with_no_extra_forward(tiny_llama, tmp_path):
    """Sandwich rule: the maximal pass (CE) is the teacher of the minimal and the sampled passes of the same
    micro-batch (BigNAS), its logits reused: three forwards in all."""
    model, ctrl, trainer = _supernet(tiny_llama, tmp_path, sandwich=True)
    batch, items = _batch(), torch.tensor(30)
    forwards = _forward_counter(model)
    loss = trainer.training_step(model, dict(batch), num_items_in_batch=items)
    assert len(forwards) == 3
    sampled = ctrl.space.config_for_step(SEED, 0, 100)
    ce_max, _ = _hand(model, ctrl, batch, "maximal", items)
    ce_min, kd_min = _hand(model, ctrl, batch, "minimal", items)
    ce_sampled, kd_sampled = _hand(model, ctrl, batch, sampled, items)
    passes = [ce_max, (1 - W) * ce_min + W * kd_min, (1 - W) * ce_sampled + W * kd_sampled]
    torch.testing.assert_close(loss, torch.stack(passes).mean().detach())  # training_step: the passes' mean
    ctrl.after_optimizer_step(0)
    assert ctrl.step_losses()[0] == pytest.approx(float(ce_sampled))
    assert ctrl.log_metrics()["elastic/distill_loss"] == pytest.approx(float(kd_sampled))


def test_a_classifiers_term_averages_over_its_labelled_examples():
    """Classifier logits (batch, classes): one item per example with a label, averaged over the micro-batch as
    transformers' classification losses are, then times the Trainer's factor."""
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    labels = torch.tensor([1, -100, 0, 2])
    term = Distillation(weight=W, temperature=T).term(student, teacher, {"labels": labels}, items=None, factor=2)
    kept = labels.ne(-100)
    by_hand = F.kl_div(F.log_softmax(student[kept] / T, -1), F.log_softmax(teacher[kept] / T, -1),
                       log_target=True, reduction="batchmean") * T * T * 2
    torch.testing.assert_close(term, by_hand)


def test_a_distilled_run_with_base_widths_and_gradient_checkpointing(tiny_llama, tmp_path):
    """FlexTrainer.train: gradient accumulation 2, gradient checkpointing (the recomputation in the backward must
    see the subnet's masks, not the teacher's: rank_layer's guard fails otherwise), base widths; the distillation
    term is logged on logging steps."""
    model, ctrl, trainer = _supernet(tiny_llama, tmp_path, BASE_WIDTHS, per_device_train_batch_size=2,
                                     gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-2,
                                     logging_steps=1, save_strategy="no", gradient_checkpointing=True,
                                     gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer.train_dataset = ProgressionData()
    forwards = _forward_counter(model)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(h["elastic/distill_loss"] > 0 for h in logs)
    distilled = sum(ctrl.history[s] != ctrl.space.maximal() for s in range(3))
    # Per micro-batch: the teacher's forward and the subnet's (the decoder layers recompute; the embedding does not).
    assert distilled == 3 and len(forwards) == 3 * 2 * 2


DISTILL = {"adapter": {"method": "elastic", "elastic": {"search_space": {}, "distill": True}}}


def test_distill_true_is_the_defaults_and_false_is_off():
    assert load_config(raw=DISTILL).adapter.elastic.distill.model_dump() == {"weight": 0.5, "temperature": 1.0}
    off = {"adapter": {"method": "elastic", "elastic": {"search_space": {}, "distill": False}}}
    assert load_config(raw=off).adapter.elastic.distill is None
