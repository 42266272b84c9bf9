"""Wanda pruning of a tiny random Llama, and the sparsity-preserving LoRA merge (SparsePEFT)."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from flexrank.errors import ConfigError
from flexrank.adapters.sparsity import sparse_merge, sparsity_of, wanda_prune


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    return LlamaForCausalLM(config)


def _batches(n=3):
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 100, (2, 16), generator=generator)} for _ in range(n)]


def _decoder_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


@pytest.fixture(scope="module")
def pruned():
    """A pruned tiny Llama, plus the unpruned weight and input norms of one module for a direct check."""
    model = _tiny_llama()
    probe = model.model.layers[1].mlp.down_proj
    weight_before = probe.weight.detach().clone()
    sq = torch.zeros(probe.in_features)
    handle = probe.register_forward_pre_hook(lambda m, a: sq.add_(a[0].reshape(-1, m.in_features).pow(2).sum(0)))
    with torch.no_grad():
        for batch in _batches():
            model(**batch)
    handle.remove()
    report = wanda_prune(model, _batches(), 0.5)
    return model, report, weight_before, sq.sqrt()


def test_wanda_prunes_half_of_every_row(pruned):
    model, report, _, _ = pruned
    linears = _decoder_linears(model)
    assert len(linears) == 14 and report["modules"] == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert report["ratio_target"] == 0.5 and report["ratio_achieved"] == 0.5
    assert report["per_module"] == {name: 0.5 for name in linears}
    for module in linears.values():
        zeros_per_row = (module.weight == 0).sum(dim=1)
        assert torch.all(zeros_per_row == module.in_features // 2)
    # The LM head and the embeddings are not pruned.
    assert not (model.lm_head.weight == 0).any() and not (model.model.embed_tokens.weight == 0).any()
    assert sparsity_of(model) == 0.5
    # Hooks are gone and the module mode is restored.
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_wanda_zeros_are_the_lowest_scores(pruned):
    model, _, weight_before, input_norm = pruned
    score = weight_before.abs() * input_norm  # |W_ij| * ||X_j||, compared within each output row
    lowest = torch.zeros_like(score, dtype=torch.bool)
    lowest.scatter_(1, score.topk(score.shape[1] // 2, dim=1, largest=False).indices, True)
    weight = model.model.layers[1].mlp.down_proj.weight
    assert torch.equal(weight == 0, lowest)
    assert torch.equal(weight[~lowest], weight_before[~lowest])


def test_wanda_input_errors_and_hook_cleanup():
    model = _tiny_llama()
    for ratio in (1.0, -0.1, "0.5", True):
        with pytest.raises(ConfigError, match=r"sparsity\.ratio.*\[0, 1\)"):
            wanda_prune(model, _batches(1), ratio)

    def failing_batches():
        yield _batches(1)[0]
        raise RuntimeError("data loader died")

    model.train()
    with pytest.raises(RuntimeError, match="data loader died"):
        wanda_prune(model, failing_batches(), 0.5)
    assert all(not m._forward_pre_hooks for m in model.modules()) and model.training
    assert sparsity_of(model) == 0.0
    with pytest.raises(ConfigError, match=r"sparsity\.calibration"):
        wanda_prune(model, [], 0.5)


def test_sparse_merge_keeps_the_zeros(pruned):
    model = copy.deepcopy(pruned[0])
    sparsity = sparsity_of(model)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    expected = {}
    for name, layer in peft_model.named_modules():
        if isinstance(layer, LoraLayer):
            weight = layer.get_base_layer().weight.detach().clone()
            expected[name.removeprefix("base_model.model.")] = (weight, layer.get_delta_weight("default").detach())
    assert len(expected) == 6
    untouched = peft_model.base_model.model.model.layers[0].self_attn.k_proj.weight.detach().clone()

    merged = sparse_merge(peft_model)
    assert type(merged) is LlamaForCausalLM
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert sparsity_of(merged) == sparsity
    for name, (before, delta) in expected.items():
        after = merged.get_submodule(name).weight
        assert delta.abs().min() > 0  # init_lora_weights=False: a dense ΔW that would fill the zeros
        assert torch.equal(after == 0, before == 0)
        kept = before != 0
        torch.testing.assert_close(after[kept], (before + delta)[kept])
    assert torch.equal(merged.model.layers[0].self_attn.k_proj.weight, untouched)


def test_sparse_merge_refuses_what_it_cannot_merge():
    model = _tiny_llama()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    with pytest.raises(ConfigError, match="adapter_name.*'other'"):
        sparse_merge(peft_model, "other")
    dora = get_peft_model(_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    before = dora.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    with pytest.raises(ConfigError, match="adapter_name.*'default'.*DoRA"):
        sparse_merge(dora)
    assert torch.equal(dora.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, before)
