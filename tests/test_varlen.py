"""Packed rows with flexrank's varlen attention (models/varlen.py), on CPU where it runs SDPA per document: the same
loss and LoRA gradients as the padded batch, no dense mask, the collator's document boundaries. The flash-attn and
torch-varlen backends are checked against the padded batch on a GPU (tests/gpu/test_cuda_paths.py)."""

import pytest
import torch
from conftest import tiny_llama_config
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from flexrank.data.records import PackingCollator, PaddingCollator
from flexrank.models import varlen

LENGTHS = [5, 23, 17, 40, 2, 9, 16]  # several per bucket of 16 tokens (CPU), padded and exact, a 2-token record


@pytest.fixture(autouse=True)
def fresh_backends():
    varlen.register()
    varlen._backends.clear()
    varlen.announce(None)
    yield
    varlen._backends.clear()


@pytest.fixture(scope="module")
def features():
    g = torch.Generator().manual_seed(1)
    out = []
    for n in LENGTHS:
        ids = torch.randint(0, 1000, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})  # a prompt without loss
    return out


@pytest.fixture()
def lora_llama():
    """A tiny GQA Llama (4 query heads, 2 KV heads) with LoRA on every attention and MLP projection."""
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(LlamaForCausalLM(tiny_llama_config()), cfg)
    assert model.config.num_attention_heads // model.config.num_key_value_heads == 2
    return model.train()


def _loss_and_grads(model, batch, attention: str):
    model.config._attn_implementation = attention  # the config every layer reads
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    return out, grads


def test_packed_row_gives_the_padded_batch_loss_and_lora_gradients(lora_llama, features):
    padded, packed = PaddingCollator(0)(features), PackingCollator()(features)
    ref, ref_grads = _loss_and_grads(lora_llama, padded, "sdpa")
    out, grads = _loss_and_grads(lora_llama, packed, varlen.ATTENTION_NAME)
    assert out.loss.item() == pytest.approx(ref.loss.item(), abs=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    offset = 0
    for row, n in enumerate(LENGTHS):  # every record's logits are those it gets on its own row
        torch.testing.assert_close(out.logits[0, offset:offset + n], ref.logits[row, :n], atol=1e-5, rtol=1e-5)
        offset += n


def test_a_packed_row_builds_no_dense_mask_and_attends_per_document(lora_llama, features, monkeypatch):
    from transformers import masking_utils

    def no_dense_mask(*args, **kwargs):
        raise AssertionError("a dense mask was built for a packed row")

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append((tuple(q.shape), tuple(k.shape), attn_mask, kwargs.get("is_causal")))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(masking_utils, "sdpa_mask", no_dense_mask)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    lora_llama.config._attn_implementation = varlen.ATTENTION_NAME
    lora_llama(**PackingCollator()(features)).loss.backward()
    # Per layer one call per bucket of documents (widths 16, 32, 48 on CPU), causal, no mask tensor: attention
    # costs the documents' lengths squared, never the row's (112 tokens).
    assert len(calls) == 3 * lora_llama.config.num_hidden_layers
    assert all(mask is None and causal is True for *_, mask, causal in calls)
    assert sorted({(q[0], q[2]) for q, *_ in calls}) == [(1, 48), (2, 32), (4, 16)]  # (documents, width)


def test_a_row_packed_without_boundaries_falls_back_to_its_position_ids(lora_llama, features):
    """A caller that packs rows itself (position_ids only): the documents are found where positions restart."""
    packed = PackingCollator()(features)
    bare = {k: v for k, v in packed.items() if not k.startswith(("cu_seq_lens", "max_length"))}
    ref, _ = _loss_and_grads(lora_llama, PaddingCollator(0)(features), "sdpa")
    out, _ = _loss_and_grads(lora_llama, bare, varlen.ATTENTION_NAME)
    assert out.loss.item() == pytest.approx(ref.loss.item(), abs=1e-6)


def test_padded_batches_take_transformers_sdpa_path(lora_llama, features):
    """Evaluation batches are padded: the same model runs them with transformers' SDPA and its padding mask."""
    padded = PaddingCollator(0)(features)
    ref, ref_grads = _loss_and_grads(lora_llama, padded, "sdpa")
    out, grads = _loss_and_grads(lora_llama, padded, varlen.ATTENTION_NAME)
    assert out.loss.item() == ref.loss.item()
    torch.testing.assert_close(out.logits, ref.logits, atol=0, rtol=0)


def test_the_collator_gives_the_documents_boundaries(features):
    batch = PackingCollator()(features)
    ends = torch.tensor(LENGTHS).cumsum(0).tolist()
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert batch[key].dtype == torch.int32 and batch[key].tolist() == [0] + ends
    assert batch["max_length_q"] == batch["max_length_k"] == max(LENGTHS)
    assert type(batch["max_length_q"]) is int  # a python int: no device-to-host copy to read it in the model
    assert batch["position_ids"][0].tolist() == [i for n in LENGTHS for i in range(n)]
    assert batch["use_cache"] is False


def test_a_backend_other_than_the_announced_one_is_logged_once(lora_llama, features, capsys):
    """The load log names the backend expected for the model's dtype; inputs that get another one (autocast,
    a CPU copy of a GPU model) say so when first used."""
    lora_llama.config._attn_implementation = varlen.ATTENTION_NAME
    varlen.announce("torch_varlen")
    for _ in range(2):
        lora_llama(**PackingCollator()(features))
    assert capsys.readouterr().out.splitlines() == [
        "[flexrank] attention: packed rows via SDPA per document (flash-attn / torch varlen need CUDA)"]
    varlen._backends.clear()
    varlen.announce("sdpa")
    lora_llama(**PackingCollator()(features))
    assert capsys.readouterr().out == ""


def test_unsupported_attention_features_are_refused_in_words(lora_llama, features):
    q = torch.zeros(1, 4, 40, 16)
    with pytest.raises(ValueError, match="softcapping needs flash-attn"):
        varlen.varlen_attention_forward(lora_llama.base_model.model.model.layers[0].self_attn, q, q[:, :2], q[:, :2],
                                        None, softcap=30.0)
    with pytest.raises(ValueError, match="sliding window of 8 needs flash-attn or torch varlen"):
        varlen.varlen_attention_forward(lora_llama.base_model.model.model.layers[0].self_attn, q, q[:, :2], q[:, :2],
                                        None, sliding_window=8)
