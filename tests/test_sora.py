"""SoRA: gates in their own param group, L1 + proximal step inside the optimizer step, exact zeros, schedule,
and export to a smaller plain peft LoRA with identical logits."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from flexrank.controllers import SoRAController
from flexrank.controllers.sora import PROX_GROUP, threshold_schedule
from flexrank.adapters.export import export_plain_adapter
from flexrank.adapters.rank_layer import rank_layers, register_rank_layer


def sora_model(model, **kwargs):
    peft_model = get_peft_model(model, register_rank_layer(LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")))
    return peft_model, SoRAController(rank_layers(peft_model), **kwargs)


def prox_once(values, prox, xi, lr=0.5):
    gate = torch.nn.Parameter(torch.tensor(values))
    ctrl = SoRAController.__new__(SoRAController)
    ctrl.prox, ctrl.step = prox, 5
    ctrl.schedule = dict(xi=xi, dense_steps=0, max_threshold=None, stages=1, stage_steps=1, kind="linear")
    opt = torch.optim.SGD([{"params": [gate], PROX_GROUP: True}], lr=lr)
    ctrl._prox(opt)
    return gate.detach().tolist()


def test_textbook_prox_is_the_lr_scaled_soft_threshold():
    # lr * xi = 0.5 * 0.2 = 0.1
    assert prox_once([0.05, -0.05, 0.3, -0.3, 0.0], "textbook", 0.2) == pytest.approx([0, 0, 0.2, -0.2, 0])


def test_sora_prox_is_the_original_sequence():
    # |g| < 2 xi -> 0 (0.15 shrinks to 0.05, then is zeroed); otherwise shrunk by xi, whatever the lr.
    assert prox_once([0.05, 0.15, -0.15, 0.3, -0.5], "sora", 0.1) == pytest.approx([0, 0, 0, 0.2, -0.4])


def test_threshold_schedule():
    kw = dict(xi=0.01, dense_steps=5, max_threshold=0.04, stages=4, stage_steps=10)
    assert threshold_schedule(4, kind="linear", **kw) == 0.0
    assert [threshold_schedule(s, kind="linear", **kw) for s in (5, 14, 15, 25, 35, 1000)] == pytest.approx(
        [0.01, 0.01, 0.02, 0.03, 0.04, 0.04])
    assert [threshold_schedule(s, kind="log_linear", **kw) for s in (5, 15, 25, 35)] == pytest.approx(
        [0.01, 0.01 * 4 ** (1 / 3), 0.01 * 4 ** (2 / 3), 0.04])
    exp = [threshold_schedule(s, kind="exp_linear", **kw) for s in (5, 15, 25, 35)]
    assert exp[0] == pytest.approx(0.01) and exp[-1] == pytest.approx(0.04) and exp == sorted(exp)


def test_gates_train_in_their_own_group_and_reach_exact_zeros(tiny_llama, batch):
    model, ctrl = sora_model(tiny_llama, sparse_lambda=0.5, threshold=0.3, prox="sora")
    gates = [p for n, p in model.named_parameters() if ".lora_gate." in n]
    assert gates and all(p.requires_grad for p in gates)
    groups = ctrl.optimizer_groups(model)
    assert groups[0]["weight_decay"] == 0.0 and {id(p) for p in groups[0]["params"]} == {id(p) for p in gates}
    others = [p for n, p in model.named_parameters() if p.requires_grad and ".lora_gate." not in n]
    opt = torch.optim.AdamW([{"params": others}] + groups, lr=1e-2)
    ctrl.attach(opt)
    model.train()
    for step in range(3):
        ctrl.before_pass(step, 0)
        model(**batch).loss.backward()
        # What AdamW must see: the loss gradient plus autograd's gradient of lambda * mean|g| over all gates.
        l1 = 0.5 * torch.cat([g.flatten() for g in gates]).abs().mean()
        expected = [p.grad + d for p, d in zip(gates, torch.autograd.grad(l1, gates))]
        opt.step()
        for p, want in zip(gates, expected):  # the pre-step hook changed the gradient AdamW used
            torch.testing.assert_close(p.grad, want, rtol=0, atol=1e-7)
        opt.zero_grad()
    zero = sum(int((p == 0).sum()) for p in gates)
    assert zero == sum(p.numel() for p in gates)  # 2xi = 0.6 > what three small steps give the ones
    assert ctrl.active_rank() == 0 and ctrl.log_metrics()["sora/zero_gates"] == 1.0


def test_l1_gradient_is_added_before_the_update(tiny_llama, batch):
    model, ctrl = sora_model(tiny_llama, sparse_lambda=2.0, threshold=0.0)
    gate = next(p for n, p in model.named_parameters() if ".lora_gate." in n)
    opt = torch.optim.SGD(ctrl.optimizer_groups(model), lr=1.0)
    ctrl.attach(opt)
    with torch.no_grad():
        gate.copy_(torch.tensor([1.0, -1.0, 0.5, 0.0]))
    before = gate.detach().clone()
    gate.grad = torch.zeros_like(gate)
    opt.step()  # SGD with a zero loss gradient: only the L1 subgradient lambda/N * sign(g) moves the gate
    n = ctrl.num_gates
    assert (before - gate.detach()).tolist() == pytest.approx((2.0 / n * torch.sign(before)).tolist())


def test_export_drops_zero_gates_with_identical_logits(tiny_llama, batch, tmp_path):
    base = copy.deepcopy(tiny_llama)
    model, ctrl = sora_model(tiny_llama, sparse_lambda=0.0, threshold=0.1)
    with torch.no_grad():
        for i, layer in enumerate(ctrl.layers.values()):
            layer.lora_B["default"].weight.normal_()
            layer.lora_gate["default"].copy_(torch.tensor([0.0, 0.7, -1.3, 0.0]) if i % 2 else torch.zeros(4))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"]).logits
    summary = export_plain_adapter(model, tmp_path / "adapter")
    assert summary["total_rank"] == 2 * (len(ctrl.layers) // 2)  # two live gates in every other module
    stock = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=batch["input_ids"]).logits, expected, rtol=0, atol=1e-5)
    full = sum(l.lora_A["default"].weight.numel() + l.lora_B["default"].weight.numel() for l in ctrl.layers.values())
    assert summary["params"] < full / 2
