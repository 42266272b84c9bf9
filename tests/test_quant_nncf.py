"""nncf INT4 QAT with LoRA (FQ_LORA) and elastic ranks (FQ_LORA_NLS): what trains, which ranks get gradient,
the stripped INT4 export, recipe validation, and DDP against a single process."""

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("nncf")

from dist_helpers import metrics, recipe, run, train_args  # noqa: E402

from flexrank.controllers.base import StepPlan
from flexrank.checkpoints import manifest as checkpoints  # noqa: E402
from flexrank.adapters import nncf as quant_nncf  # noqa: E402
from flexrank.config import load_config  # noqa: E402
from flexrank.errors import ConfigError  # noqa: E402

NLS_SPACE = {"search_space": {"one_rank_per_layer": True, "widths": [8, 6, 4]}, "evaluate_subnets": []}


def nncf_config(method="elastic", **overrides):
    adapter = {"method": method, "r": 8, **({"elastic": NLS_SPACE} if method == "elastic" else {})}
    return load_config(raw={"model": {"quantization": {"method": "nncf_int4", "group_size": 32}},
                            "adapter": adapter, "training": {"learning_rate": 1e-2, "seed": 3}, **overrides})


def sample():
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def compressed(tiny_llama, method="elastic"):
    cfg = nncf_config(method)
    model = quant_nncf.compress(tiny_llama, cfg, sample())
    return cfg, model, quant_nncf.build_controller(cfg, model, StepPlan(
        steps_per_epoch=10, total_steps=10, gradient_accumulation_steps=1, seed=cfg.training["seed"],
        learning_rate=cfg.training["learning_rate"]))


@pytest.mark.parametrize("method", ["lora", "elastic"])
def test_two_steps_update_adapters_and_scales_only(tiny_llama, method):
    cfg, model, controller = compressed(tiny_llama, method)
    groups = controller.optimizer_groups(model)
    assert [g["lr"] for g in groups] == [1e-2, 1e-3]  # adapters at lr, scales at lr/10
    quantizers = quant_nncf.lora_quantizers(model)
    assert len(quantizers) == 14  # 7 Linear layers x 2 decoder layers; lm_head stays float (backup none)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(groups)
    for step in range(2):
        controller.before_pass(step, 0)
        model(**sample()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.endswith(".lora_A") for n in changed) and any(n.endswith(".lora_B") for n in changed)
    assert any(n.endswith(".input_low") for n in changed)  # a quantizer scale
    assert not any("__nncf_hooks" not in n for n in changed)  # the base weights stay frozen


def test_nls_rank_follows_the_controllers_sampled_subnet(tiny_llama):
    cfg, model, controller = compressed(tiny_llama)
    quantizers = quant_nncf.lora_quantizers(model)
    for q in quantizers.values():
        q.lora_B.data.normal_(0, 0.1)  # nonzero B, so lora_A gets gradient too
    widths_seen = set()
    for step in range(4):
        controller.before_pass(step, 0)
        layer_width = {g.name.split(":")[0]: w for g, w in zip(controller.space.groups, controller.config.values())}
        model.zero_grad()
        model(**sample()).loss.backward()
        for name, q in quantizers.items():
            width = layer_width[f"L{name.split('.layers.')[1].split('.')[0]}"]
            widths_seen.add(width)
            rows = q.lora_A.grad.abs().sum(dim=1) != 0
            cols = q.lora_B.grad.abs().sum(dim=0) != 0
            assert rows.tolist() == [True] * width + [False] * (8 - width), (step, name)
            assert cols.tolist() == [True] * width + [False] * (8 - width), (step, name)
    assert len(widths_seen) > 1  # the draws really differ
    assert controller.history[3] == controller.space.sample(3, 3)  # drawn from (seed, step): seed 3 here


def test_stripped_int4_model_reloads_with_the_fake_quantized_logits(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    from flexrank.models.assets import smollm2_dir

    cfg, model, controller = compressed(tiny_llama)
    torch.manual_seed(0)
    for q in quant_nncf.lora_quantizers(model).values():
        q.lora_B.data.normal_(0, 0.05)  # a trained-looking adapter, so absorbing it matters
    controller.activate("heuristic")
    ids = sample()["input_ids"]
    with torch.no_grad():
        fake_quant = model(input_ids=ids).logits
        controller.activate("maximal")
        other_subnet = model(input_ids=ids).logits
        controller.activate("heuristic")
    info = quant_nncf.export_int4(model, AutoTokenizer.from_pretrained(smollm2_dir()), tmp_path, {"input_ids": ids})
    loaded = quant_nncf.load_int4(info["int4_model"])
    weight = loaded.model.layers[0].mlp.up_proj.weight
    assert weight.dtype == torch.uint8 and weight.numel() == 64 * 128 // 2  # two INT4 values per byte
    with torch.no_grad():
        int4 = loaded(input_ids=ids).logits
    # Measured (2 seeds): max |difference| 0.010-0.013, mean 1.4e-3, logits' std 1.6, same argmax everywhere; a
    # weight near an INT4 rounding boundary can land one level apart once W + B@A is packed.
    difference = (int4 - fake_quant).abs()
    assert difference.max() < 0.03 and difference.mean() < 3e-3
    assert torch.equal(int4.argmax(-1), fake_quant.argmax(-1))
    assert (int4 - other_subnet).abs().max() > 0.1  # the heuristic subnet's ranks were absorbed, not the maximal
    assert info["int4_model"] == str(tmp_path / "int4_model")
    assert info["int4_model_bytes"] == (tmp_path / "int4_model" / "model.safetensors").stat().st_size
    with torch.no_grad():  # the saved model is the stripped model in memory, bit for bit
        assert torch.equal(int4, quant_nncf.strip_int4(model, {"input_ids": ids})(input_ids=ids).logits)


@pytest.mark.parametrize("change, key", [
    ({"adapter": {"method": "sora"}}, "adapter.method"),
    ({"adapter": {"method": "lora"}, "distributed": {"backend": "fsdp2", "nproc": 2}}, "distributed.backend"),
    ({"adapter": {"method": "lora"}, "distributed": {"backend": "zero3", "nproc": 2}}, "distributed.backend"),
])
def test_unsupported_combinations_are_refused_up_front(change, key):
    raw = {"model": {"quantization": {"method": "nncf_int4"}}, **change}
    with pytest.raises(ConfigError, match=key):
        load_config(raw=raw)


def test_bitsandbytes_stays_the_default_quantization():
    cfg = load_config(raw={"model": {"quantization": {"bnb_4bit_quant_type": "nf4"}}})
    assert cfg.model.quantization.method == "bitsandbytes"


def test_ddp_matches_single_process(tmp_path, tiny_llama_dir):
    path = recipe(tmp_path, tiny_llama_dir, "lora", max_steps=3)
    extra = ("--set", "adapter.method=elastic", "--set", "adapter.r=8", "--set", f"adapter.elastic={NLS_SPACE}",
             "--set", "model.quantization={method: nncf_int4, group_size: 32}")
    outs = {b: tmp_path / b for b in ("single", "ddp")}
    for backend, out in outs.items():
        run(train_args(path, out, backend, *extra))
    ref, ddp = metrics(outs["single"]), metrics(outs["ddp"])
    assert ddp["train"]["world_size"] == 2
    # bf16 adapters (nncf's dtype): accumulation vs all-reduce round differently at bf16 precision.
    assert ddp["train"]["losses"] == pytest.approx(ref["train"]["losses"], abs=1e-3)
    assert (outs["ddp"] / "elastic_samples.jsonl").read_text() == (outs["single"] / "elastic_samples.jsonl").read_text()
    a, b = (quant_nncf.load_int4(o / "int4_model").state_dict() for o in outs.values())
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k].dtype == torch.uint8 and not torch.equal(a[k], b[k])]
    scales = [k for k in a if a[k].is_floating_point()]
    for k in scales:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-3, msg=k)
    assert len(differ) <= len([k for k in a if a[k].dtype == torch.uint8]) // 4  # a few rounding flips at most


def test_resume_is_exact(tmp_path, tiny_llama_dir):
    """A run resumed from its step-2 checkpoint ends where the uninterrupted run ends (nncf state and the
    elastic sampler travel in the checkpoint)."""
    path = recipe(tmp_path, tiny_llama_dir, "lora", max_steps=4, save_strategy="steps", save_steps=2)
    extra = ("--set", "adapter.method=elastic", "--set", "adapter.r=8", "--set", f"adapter.elastic={NLS_SPACE}",
             "--set", "model.quantization={method: nncf_int4, group_size: 32}")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run(train_args(path, full, "single", *extra, match_two_processes=False))
    quant_nncf.allow_config_globals()
    state = torch.load(full / "checkpoint-2" / "flexrank_controller.pt", weights_only=True)
    assert {"nncf_config", "nncf_state_dict", "seed", "config"} <= set(state)
    # The Trainer's model file holds the hook parameters too; drop them, so the nncf state must come from ours.
    model_file = full / "checkpoint-2" / "model.safetensors"
    save_file({k: v for k, v in load_file(model_file).items() if "__nncf_hooks" not in k}, model_file)
    checkpoints.mark_complete(model_file.parent, checkpoints.meta(model_file.parent))
    run(train_args(path, resumed, "single", *extra, "--set", f"training.resume_from_checkpoint={full}/checkpoint-2",
                   match_two_processes=False))
    assert metrics(resumed)["train"]["resumed_from"]
    assert metrics(resumed)["train"]["losses"] == pytest.approx(metrics(full)["train"]["losses"], abs=1e-6)
    a, b = (quant_nncf.load_int4(o / "int4_model").state_dict() for o in (full, resumed))
    for k in a:
        assert torch.equal(a[k], b[k]), k
