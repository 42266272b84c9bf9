"""AdaLoRA on the rank layer: cubic budget, importance from real gradients, masks (never parameter edits), the
orthogonal regulariser's gradient, exact target budget, state round trip, export."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from flexrank.trainer.controllers import AdaLoRAController
from flexrank.trainer.controllers.adalora import budget_at
from flexrank.trainer.export import export_plain_adapter
from flexrank.trainer.rank_layer import _OrthogonalityGradient, orthogonality, rank_layers, register_rank_layer


def adalora_model(model, **kwargs):
    peft_model = get_peft_model(model, register_rank_layer(LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")))
    with torch.no_grad():  # AdaLoRA init: Λ = 0, A and B random (as modeling.apply_adapter does)
        for name, p in peft_model.named_parameters():
            if ".lora_gate." in name:
                p.zero_()
            elif ".lora_A." in name or ".lora_B." in name:
                p.normal_(std=0.02)
    return peft_model, AdaLoRAController(rank_layers(peft_model), **kwargs)


def train(model, ctrl, batch, steps, lr):
    """The Trainer's order: backward, final gradients -> controller, optimizer step, zero_grad."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    budgets = []
    for step in range(steps):
        ctrl.before_pass(step, 0)
        model(**batch).loss.backward()
        ctrl.on_final_gradients()
        opt.step()
        opt.zero_grad()
        budgets.append(ctrl.budget)
    return budgets


def test_cubic_budget_matches_peft_rank_allocator():
    kw = dict(init_budget=112, target_budget=28, tinit=5, tfinal=10, total_step=40, delta_t=2)
    assert budget_at(5, **kw) == (112, False)
    assert budget_at(10, **kw) == (int(84 * (1 - 5 / 25) ** 3 + 28), True)
    assert budget_at(11, **kw)[1] is False
    assert budget_at(31, **kw) == (28, True) and budget_at(39, **kw) == (28, True)


def test_orthogonality_gradient_is_the_regulariser_gradient():
    a = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    out = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    _OrthogonalityGradient.apply(out, a, b, 0.3).sum().backward()
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    eye = torch.eye(4, dtype=torch.float64)
    (0.3 * ((a2 @ a2.T - eye).norm() + (b2.T @ b2 - eye).norm())).backward()
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)
    assert orthogonality(a.detach(), b.detach()) == pytest.approx(float((a2 @ a2.T - eye).norm() + (b2.T @ b2 - eye).norm()))


def test_budget_reaches_target_with_masks_only(tiny_llama, batch):
    model, ctrl = adalora_model(tiny_llama, target_r=2, total_step=10, tinit=1, tfinal=3, delta_t=1)
    budgets = train(model, ctrl, batch, steps=10, lr=1e-2)
    assert budgets[0] == 56 and budgets[-1] == 28 and budgets == sorted(budgets, reverse=True)
    assert ctrl.active_rank() == 28 and ctrl.final
    masks = {n: l.lora_rank_mask["default"].clone() for n, l in ctrl.layers.items()}
    assert {int(m.sum()) for m in masks.values()} != {2}  # allocated unevenly, by importance
    assert all(l.lora_gate["default"].abs().sum() > 0 for l in ctrl.layers.values())  # no parameter was zeroed
    state = ctrl.state_dict()
    _, fresh = adalora_model(copy.deepcopy(tiny_llama), target_r=2, total_step=10, tinit=1, tfinal=3)
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.layers[n].lora_rank_mask["default"], m) for n, m in masks.items())
    assert fresh.budget == 28 and fresh.final and fresh.exp_avg_ipt.keys() == ctrl.exp_avg_ipt.keys()


def test_export_keeps_the_allocated_ranks(tiny_llama, batch, tmp_path):
    base = copy.deepcopy(tiny_llama)
    model, ctrl = adalora_model(tiny_llama, target_r=2, total_step=4, tinit=0, tfinal=1)
    train(model, ctrl, batch, steps=4, lr=5e-2)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"]).logits
    summary = export_plain_adapter(model, tmp_path / "adapter")
    assert summary["total_rank"] == 28
    stock = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=batch["input_ids"]).logits, expected, rtol=0, atol=1e-5)
