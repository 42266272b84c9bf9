"""AdaLoRA on the rank layer: cubic budget, importance from real gradients, masks (never parameter edits), the
orthogonal regulariser's gradient, exact target budget, state round trip, export."""

import copy
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from flexrank.controllers import AdaLoRAController
from flexrank.adapters.export import export_plain_adapter
from flexrank.adapters.rank_layer import _OrthogonalityGradient, rank_layers, register_rank_layer


def adalora_model(model, **kwargs):
    peft_model = get_peft_model(model, register_rank_layer(LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")))
    with torch.no_grad():  # AdaLoRA init: Λ = 0, A and B random (as adapters.peft_methods.apply_adapter does)
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


def _peft_allocator(ctrl, **schedule):
    """peft's own RankAllocator over a module shaped like peft's AdaLoRA (lora_A r x in, lora_E r x 1,
    lora_B out x r per adapted module), and a function that copies the controller's tensors into it."""
    from peft import AdaLoraConfig
    from peft.tuners.adalora.layer import RankAllocator

    shadow = torch.nn.Module()
    for i, layer in enumerate(ctrl.layers.values()):
        m, param = torch.nn.Module(), lambda t: torch.nn.ParameterDict({"default": torch.nn.Parameter(t)})
        m.lora_A = param(layer.lora_A["default"].weight.detach().clone())
        m.lora_E = param(torch.zeros(layer.r["default"], 1))
        m.lora_B = param(layer.lora_B["default"].weight.detach().clone())
        shadow.add_module(f"m{i:02d}", m)  # zero-padded: peft sorts and scans modules by name

    def copy_in():
        with torch.no_grad():
            for (_, layer), m in zip(ctrl.layers.items(), shadow.children()):
                for ours, theirs in ((layer.lora_A["default"].weight, m.lora_A["default"]),
                                     (layer.lora_B["default"].weight, m.lora_B["default"]),
                                     (layer.lora_gate["default"], m.lora_E["default"])):
                    theirs.copy_(ours.view_as(theirs))
                    theirs.grad = ours.grad.detach().clone().view_as(theirs)

    config = AdaLoraConfig(target_r=ctrl.target_r, init_r=4, beta1=ctrl.beta1, beta2=ctrl.beta2, **schedule)
    return shadow, RankAllocator(shadow, config, "default"), copy_in


def test_importance_budget_and_masks_match_peft_rank_allocator(tiny_llama):
    """Every step, peft's RankAllocator gets the same tensors and gradients: same importance EMAs, budget and
    (at every masking step) the same surviving triplets. A new batch every step, so that the uncertainty term
    changes the ranking (with one fixed batch, ranking by importance alone happens to give the same masks)."""
    schedule = dict(total_step=8, tinit=1, tfinal=2, deltaT=1)
    model, ctrl = adalora_model(tiny_llama, target_r=2, total_step=8, tinit=1, tfinal=2, delta_t=1)
    shadow, allocator, copy_in = _peft_allocator(ctrl, **schedule)
    names = list(ctrl.layers)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    masked_steps, data = [], torch.Generator().manual_seed(1)
    for step in range(8):
        ids = torch.randint(0, 1000, (2, 12), generator=data)
        ctrl.before_pass(step, 0)
        model(input_ids=ids, labels=ids).loss.backward()
        copy_in()
        ctrl.on_final_gradients()
        budget, pattern = allocator.update_and_allocate(shadow, step)
        assert ctrl.budget == budget, step
        if step < 6:  # importance is updated until total_step - tfinal (then the mask is frozen)
            for i, name in enumerate(names):
                for part, key in (("A", "lora_A"), ("B", "lora_B"), ("E", "lora_E")):
                    peft_key = f"m{i:02d}.{key}.default"
                    torch.testing.assert_close(ctrl.exp_avg_ipt[f"{name}:{part}"].view(-1),
                                               allocator.exp_avg_ipt[peft_key].view(-1), rtol=1e-5, atol=1e-12)
                    torch.testing.assert_close(ctrl.exp_avg_unc[f"{name}:{part}"].view(-1),
                                               allocator.exp_avg_unc[peft_key].view(-1), rtol=1e-5, atol=1e-12)
        if pattern is not None:
            masked_steps.append(step)
            ours = [ctrl.layers[n].lora_rank_mask["default"].bool().tolist() for n in names]
            assert ours == [pattern[f"m{i:02d}.lora_E.default"] for i in range(len(names))], step
        opt.step()
        opt.zero_grad()
    assert masked_steps == [2, 3, 4, 5, 6, 7] and ctrl.active_rank() == 2 * len(names)
    # The final importance ranks the triplets as peft's does at any budget, not only at those the schedule took.
    for budget in (5, 12, 20, 40, 50):
        ctrl._mask_to_budget(budget)
        pattern = allocator.mask_to_budget(shadow, budget)
        ours = [ctrl.layers[n].lora_rank_mask["default"].bool().tolist() for n in names]
        assert ours == [pattern[f"m{i:02d}.lora_E.default"] for i in range(len(names))], budget
    assert {sum(m) for m in (l.lora_rank_mask["default"].tolist() for l in ctrl.layers.values())} != {2}


def test_orthogonality_gradient_is_the_regulariser_gradient():
    a = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    out = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    holder = SimpleNamespace()
    _OrthogonalityGradient.apply(out, a, b, 0.3, holder).sum().backward()
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    eye = torch.eye(4, dtype=torch.float64)
    (0.3 * ((a2 @ a2.T - eye).norm() + (b2.T @ b2 - eye).norm())).backward()
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)
    # The backward leaves the regulariser's value (without the weight) for logging.
    assert float(holder.orthogonality_value) == pytest.approx(float((a2 @ a2.T - eye).norm() + (b2.T @ b2 - eye).norm()))


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


def test_batched_regulariser_gradient_equals_the_layers_own(tiny_llama, batch):
    """Where A and B are whole tensors (one process, DDP, ZeRO-1/2), the trainer's extra loss carries the orthogonal
    regulariser for all layers at once, batched per shape group, once the first pass has switched the layers' own
    off: the same gradients, the same logged value. A loop that never asks for the extra loss keeps the layers'."""
    per_layer, ctrl_a = adalora_model(copy.deepcopy(tiny_llama), target_r=2, total_step=10)
    batched, ctrl_b = adalora_model(tiny_llama, target_r=2, total_step=10)
    batched.load_state_dict(per_layer.state_dict())  # the same random A and B
    assert ctrl_b.extra_loss() is None  # the first call decides (this pass's forward had the layers' regulariser)
    assert all(l.orthogonality_weight == 0 for l in ctrl_b.layers.values())
    assert {l.orthogonality_weight for l in ctrl_a.layers.values()} == {ctrl_b.orthogonality_weight}
    per_layer.train(), batched.train()
    per_layer(**batch).loss.backward()
    loss = batched(**batch).loss
    extra = ctrl_b.extra_loss()
    assert extra is not None and float(extra) == 0.0
    (loss + extra).backward()
    for (name, p), q in zip(per_layer.named_parameters(), batched.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-9, msg=name)
    assert ctrl_b.log_metrics()["adalora/orthogonality"] == pytest.approx(
        ctrl_a.log_metrics()["adalora/orthogonality"], rel=1e-6)
    with torch.no_grad():  # evaluation: no term
        assert ctrl_b.extra_loss() is None
