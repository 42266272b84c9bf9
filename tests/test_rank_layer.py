"""The rank-controlled LoRA layer: masking equals slicing, masked gradients are zeros, export is exact."""

import random

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from flexrank.adapters.export import export_plain_adapter
from flexrank.adapters.rank_layer import guard_recomputation, rank_layers, register_rank_layer

R, ALPHA = 8, 16


def rank_model(model, **kw):
    cfg = register_rank_layer(LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                                         init_lora_weights=False, **kw))
    return get_peft_model(model, cfg)


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


@pytest.mark.parametrize("width", [1, 4, 8])
def test_masked_subnet_equals_plain_lora_of_that_rank(tiny_llama, batch, width):
    import copy

    base = copy.deepcopy(tiny_llama)
    supernet = rank_model(tiny_llama)
    for layer in rank_layers(supernet).values():
        layer.set_width(width)
    # A plain peft LoRA of rank `width` with the first rows/columns and the supernet's scale alpha/r_max.
    plain = get_peft_model(base, LoraConfig(r=width, lora_alpha=ALPHA * width / R, target_modules="all-linear"))
    sliced = {}
    for name, layer in rank_layers(supernet).items():
        sliced[f"{name}.lora_A.default.weight"] = layer.lora_A["default"].weight[:width]
        sliced[f"{name}.lora_B.default.weight"] = layer.lora_B["default"].weight[:, :width]
    missing = plain.load_state_dict(sliced, strict=False)
    assert not missing.unexpected_keys
    torch.testing.assert_close(logits(supernet, batch), logits(plain, batch), rtol=0, atol=1e-5)


def test_masked_ranks_get_zero_gradients_not_none(tiny_llama, batch):
    model = rank_model(tiny_llama)
    for layer in rank_layers(model).values():
        layer.set_width(3)
    model(**batch).loss.backward()
    for layer in rank_layers(model).values():
        a, b = layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad
        assert a is not None and b is not None
        assert torch.count_nonzero(a[3:]) == 0 and torch.count_nonzero(b[:, 3:]) == 0
        assert torch.count_nonzero(a[:3]) > 0 and torch.count_nonzero(b[:, :3]) > 0
        assert layer.lora_gate["default"].grad is None  # gates are frozen unless a controller learns them


def _checkpointed(model):
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def test_gradient_checkpointing_recomputes_each_pass_with_its_own_subnet(tiny_llama, batch):
    """Two passes with different subnets (a sandwich step): the recomputation in each backward sees that pass's
    mask, so the accumulated gradients equal those without checkpointing."""
    import copy

    plain_model = rank_model(copy.deepcopy(tiny_llama)).train()
    ckpt_model = _checkpointed(rank_model(tiny_llama))
    ckpt_model.load_state_dict(plain_model.state_dict())
    seen = []  # the width each forward of one layer ran with: forward, recompute, forward, recompute
    probe = rank_layers(ckpt_model)["base_model.model.model.layers.1.mlp.down_proj"]
    weights = probe.rank_weights  # (module hooks do not run again in the recomputation: record here)
    probe.rank_weights = lambda a: seen.append(int(probe.lora_rank_mask[a].sum())) or weights(a)
    grads = []
    for model in (plain_model, ckpt_model):
        for width in (5, 2):
            for layer in rank_layers(model).values():
                layer.set_width(width)
            model(**batch).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.grad is not None]))
    assert seen == [5, 5, 2, 2]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_mask_changed_before_the_recompute_is_an_error(tiny_llama, batch):
    """A controller that rewrote a mask between a forward and its backward would make the checkpoint
    recomputation train another subnet than the loss was computed with: refused, never silently wrong."""
    model = _checkpointed(rank_model(tiny_llama))
    for layer in rank_layers(model).values():
        layer.set_width(5)
    loss = model(**batch).loss
    rank_layers(model)["base_model.model.model.layers.0.self_attn.v_proj"].set_width(2)
    with pytest.raises(RuntimeError, match="rank mask changed between a forward pass and its backward"):
        loss.backward()


def _graph_nodes(tensor) -> list[str]:
    seen, todo, names = set(), [tensor.grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo += [next_fn for next_fn, _ in node.next_functions]
    return names


def test_mask_check_only_where_the_model_recomputes(tiny_llama, batch):
    """The check costs a Python autograd node per layer: FlexTrainer switches it off without gradient checkpointing
    (the backward then uses the mask product saved in forward), and on with it."""
    model = rank_model(tiny_llama).train()
    layers = len(rank_layers(model))
    guards = lambda: _graph_nodes(model(**batch).loss).count("_MaskUnchangedUntilBackwardBackward")  # noqa: E731
    assert guards() == layers  # a model nobody checked keeps the safe default
    assert guard_recomputation(model) is False and guards() == 0
    # Without the check, a mask written between forward and backward cannot change the gradients.
    for layer in rank_layers(model).values():
        layer.set_width(5)
    model(**batch).loss.backward()
    expected = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    loss = model(**batch).loss
    for layer in rank_layers(model).values():
        layer.set_width(2)
    loss.backward()
    for want, p in zip(expected, [p for p in model.parameters() if p.grad is not None]):
        torch.testing.assert_close(p.grad, want, rtol=0, atol=0)
    model.zero_grad()
    _checkpointed(model)
    assert guard_recomputation(model) is True
    loss = model(**batch).loss
    assert "_MaskUnchangedUntilBackwardBackward" in _graph_nodes(loss)  # inside the checkpointed layers' graph
    loss.backward()


def test_export_random_subnet_loads_in_stock_peft_with_identical_logits(tiny_llama, batch, tmp_path):
    import copy

    base = copy.deepcopy(tiny_llama)
    model = rank_model(tiny_llama).eval()
    rng = random.Random(0)
    for layer in rank_layers(model).values():
        layer.set_width(rng.choice([0, 1, 3, 8]))
    rank_layers(model)["base_model.model.model.layers.0.self_attn.q_proj"].set_width(0)
    expected = logits(model, batch)
    summary = export_plain_adapter(model, tmp_path / "adapter")
    assert "model.layers.0.self_attn.q_proj" not in summary["rank_pattern"]  # rank 0: left out
    assert summary["total_rank"] == sum(summary["rank_pattern"].values()) < R * len(rank_layers(model))
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(reloaded, batch), expected, rtol=0, atol=1e-5)
    for name, layer in rank_layers(model).items():  # the adapter holds exactly the active ranks
        key = name.removeprefix("base_model.model.")
        width = int(layer.lora_rank_mask["default"].sum())
        assert summary["rank_pattern"].get(key, 0) == width


def test_peft_merge_uses_the_active_subnet(tiny_llama, batch):
    model = rank_model(tiny_llama).eval()
    for layer in rank_layers(model).values():
        layer.set_width(2)
    expected = logits(model, batch)
    merged = model.merge_and_unload()
    # Merging changes the summation order; logits here are O(10), so fp32 round-off reaches ~2e-5.
    torch.testing.assert_close(logits(merged, batch), expected, rtol=1e-5, atol=5e-5)
