"""Every adapter method trains on a tiny model and its saved adapter reloads in stock peft with identical
logits; QLoRA runs on CPU with fp32 compute. Models load through flexrank's own builder (models/loading.py)."""

import pytest
import torch
from peft import PeftModel

from flexrank.config import load_config
from flexrank.adapters.peft_methods import apply_adapter
from flexrank.models.loading import load_base_model, load_tokenizer

CASES = {
    "lora": {"method": "lora"},
    "dora": {"method": "dora"},
    "rslora": {"method": "rslora"},
    "layer_replication": {"method": "lora", "layer_replication": [[0, 2], [1, 2]]},
    "miss": {"method": "miss", "r": 16, "target_modules": ["q_proj", "o_proj", "up_proj"]},
    "bat": {"method": "bat", "r": 16, "target_modules": ["q_proj", "o_proj"]},
    "qlora": {"method": "lora", "_quant": True},
    "qdora": {"method": "dora", "_quant": True},
}


def build(model_dir, case):
    adapter = {k: v for k, v in CASES[case].items() if not k.startswith("_")}
    raw = {"model": {"name_or_path": str(model_dir)}, "adapter": adapter}
    if CASES[case].get("_quant"):
        raw["model"]["quantization"] = {"bnb_4bit_compute_dtype": "float32"}
    cfg = load_config(raw=raw)
    tok = load_tokenizer(cfg.model)
    return cfg, load_base_model(cfg.model, tok, log=lambda *_: None)


@pytest.mark.parametrize("case", list(CASES))
def test_method_trains_and_reloads_in_stock_peft(tiny_llama_dir, case, tmp_path):
    torch.manual_seed(0)
    cfg, base = build(tiny_llama_dir, case)
    if CASES[case].get("_quant"):
        import bitsandbytes as bnb

        assert isinstance(base.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    model = apply_adapter(base, cfg.adapter, cfg.model.task_type)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "miss_" in n for n in trainable)
    ids = torch.randint(0, 2000, (4, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert len(changed) == len(trainable)

    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    _, fresh = build(tiny_llama_dir, case)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_every_recipe_method_has_its_method_object():
    """Each adapter.method (and each nncf quantization a method allows) resolves to a method object of its own."""
    from typing import get_args

    from flexrank.adapters import nncf, peft_methods, rank_methods
    from flexrank.adapters.registry import method_for
    from flexrank.config import AdapterConfig

    expected = {"lora": peft_methods.PeftMethod, "dora": peft_methods.PeftMethod, "rslora": peft_methods.PeftMethod,
                "miss": peft_methods.PeftMethod, "bat": peft_methods.PeftMethod,
                "elastic": rank_methods.ElasticMethod, "adalora": rank_methods.AdaLoRAMethod,
                "sora": rank_methods.SoRAMethod}
    assert set(get_args(AdapterConfig.model_fields["method"].annotation)) == set(expected)
    space = {"search_space": {"groups": [["q_proj"]], "widths": [4, 2]}}
    for name, cls in expected.items():
        adapter = {"method": name, **({"elastic": space} if name == "elastic" else {})}
        assert type(method_for(load_config(raw={"adapter": adapter}))) is cls, name
    for quantization, name, cls in (("nncf_int4", "lora", nncf.NncfLoraQat), ("nncf_int4", "elastic", nncf.NncfElasticQat),
                                    ("nncf_int4_ptq", "lora", nncf.NncfPtq),
                                    ("bitsandbytes", "elastic", rank_methods.ElasticMethod)):
        adapter = {"method": name, **({"elastic": space} if name == "elastic" else {})}
        cfg = load_config(raw={"adapter": adapter, "model": {"quantization": {"method": quantization}}})
        assert type(method_for(cfg)) is cls, (quantization, name)
