"""Importance-ordered base widths (elastic/importance.py): the permutation leaves the maximal model's logits
unchanged (base and adapters, MLP channels and GQA head groups), the kept prefix is the channel a hand-built layer
makes important, a prefix of the ordered model is the original model with the least important channels dropped,
the plain adapter export maps back to the stock base, and the recipe switch is validated up front."""

import copy

import pytest
import torch
from conftest import tiny_llama_config
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM

from flexrank.config import load_config
from flexrank.elastic import importance
from flexrank.elastic.base_masks import BaseMasks, find_base_targets
from flexrank.errors import ConfigError

IDS = torch.randint(0, 1000, (3, 10), generator=torch.Generator().manual_seed(1))


def _lora_llama(seed: int = 0):
    """Tiny Llama (hidden 64, intermediate 128, 4 heads of 16 sharing 2 key/value heads) with LoRA on every linear,
    lora_B random so that a wrongly permuted adapter shows in the logits."""
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(LlamaForCausalLM(tiny_llama_config()), cfg).eval()


def _random_order(model, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {importance.order_key(t.layer, t.kind): torch.randperm(t.size // t.unit, generator=g)
            for t in find_base_targets(model).values()}


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_permutation_keeps_logits():
    model = _lora_llama()
    before = _logits(model)
    order = _random_order(model)
    assert importance.apply_order(model, order) > 0
    assert set(order) == {"L0:mlp", "L0:attention", "L1:mlp", "L1:attention"}
    assert order["L0:attention"].numel() == 2  # whole key/value groups (2 query heads each)
    torch.testing.assert_close(_logits(model), before, atol=1e-5, rtol=1e-5)


def test_permutation_touches_the_weights():
    """Guard against a no-op permutation passing the logits test: the weights really moved."""
    model = _lora_llama()
    up = model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight
    first = up[0].clone()
    order = {"L0:mlp": torch.arange(128).flip(0)}
    importance.apply_order(model, order)
    torch.testing.assert_close(up[127], first)


def _plain_llama(seed: int = 0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def test_activation_and_magnitude_put_the_important_channel_first():
    """A hand-built layer: MLP channel 77 of layer 0 and key/value group 1 of layer 1 get large down_proj / o_proj
    columns, so their contribution to the output is by far the largest."""
    for method in ("activation", "magnitude"):
        model = _plain_llama()
        layers = model.model.layers
        with torch.no_grad():
            layers[0].mlp.down_proj.weight[:, 77] *= 50
            layers[1].self_attn.o_proj.weight[:, 32:] *= 50  # group 1: query heads 2-3 (2 x head_dim 16)
            layers[1].self_attn.v_proj.weight[16:] *= 5        # its key/value head
        targets = list(find_base_targets(model).values())
        order = importance.compute_order(model, targets, method, lambda: [{"input_ids": IDS}])
        assert order["L0:mlp"][0] == 77, method
        assert order["L1:attention"].tolist() == [1, 0], method


def test_padding_is_not_counted():
    """A padded position with a huge activation must not change the activation order."""
    model = _plain_llama()
    targets = [t for t in find_base_targets(model).values() if t.kind == "mlp"]
    ids = IDS.clone()
    mask = torch.ones_like(ids)
    mask[:, -3:] = 0
    plain = importance.compute_order(model, targets, "activation",
                                     lambda: [{"input_ids": ids[:, :-3], "attention_mask": mask[:, :-3]}])
    padded = importance.compute_order(model, targets, "activation", lambda: [{"input_ids": ids, "attention_mask": mask}])
    for key in plain:
        assert torch.equal(plain[key], padded[key])


def test_ordered_prefix_is_the_original_with_least_important_channels_dropped():
    """Masking all but the first w channels of the ordered model = zeroing, in the original model, every channel
    the order does not put in front (the compact export slices that prefix)."""
    ordered, original = _lora_llama(), _lora_llama()
    order = _random_order(ordered, seed=5)
    importance.apply_order(ordered, order)
    targets = find_base_targets(ordered)
    mlp, attn = targets[0, "mlp"], targets[1, "attention"]
    BaseMasks(ordered, {mlp.module: mlp.size, attn.module: attn.size}).set_widths({mlp.module: 80, attn.module: 32})
    kept_mlp = order["L0:mlp"][:80]
    kept_group = order["L1:attention"][0]

    def zero_dropped(module, args):
        x = args[0].clone()
        name = names[module]
        keep = torch.zeros(x.shape[-1], dtype=torch.bool)
        if name == mlp.module:
            keep[kept_mlp] = True
        else:
            keep[kept_group * 32:(kept_group + 1) * 32] = True
        return (x * keep,) + tuple(args[1:])

    modules = dict(original.named_modules())
    names = {modules[mlp.module]: mlp.module, modules[attn.module]: attn.module}
    for module in names:
        module.register_forward_pre_hook(zero_dropped)
    reference = _logits(original)
    assert (reference - _logits(_lora_llama())).abs().max() > 1e-2  # the cut matters
    torch.testing.assert_close(_logits(ordered), reference, atol=1e-5, rtol=1e-5)


def test_plain_adapter_maps_back_to_the_stock_base(tmp_path):
    """The adapter of an ordered model, exported and permuted back, on the stock (unordered) base with stock peft
    gives the ordered model's logits."""
    from flexrank.adapters.export import export_plain_adapter

    model = _lora_llama()
    order = _random_order(model, seed=7)
    importance.apply_order(model, order)
    expected = _logits(model)
    export_plain_adapter(model, tmp_path / "a", transform=lambda s: importance.unpermute_adapter_state(s, model, order))
    stock = PeftModel.from_pretrained(copy.deepcopy(_lora_llama().get_base_model()), tmp_path / "a").eval()
    torch.testing.assert_close(_logits(stock), expected, atol=1e-5, rtol=1e-5)


def test_saved_order_round_trips_and_refuses_a_wrong_model(tmp_path):
    model = _lora_llama()
    order = _random_order(model)
    importance.save_order(tmp_path, order, "activation")
    loaded = importance.load_order(tmp_path)
    assert loaded.keys() == order.keys() and all(torch.equal(loaded[k], order[k]) for k in order)
    with pytest.raises(ConfigError, match="L5:mlp"):
        importance.apply_order(model, {"L5:mlp": torch.arange(128)})
    with pytest.raises(ConfigError, match="permutation of 128"):
        importance.apply_order(model, {"L0:mlp": torch.zeros(128, dtype=torch.int64)})


def _cfg(**elastic):
    return {"adapter": {"method": "elastic", "r": 8, "elastic": {"search_space": {"groups": [["q_proj"]],
                                                                                  "widths": [8, 4]}, **elastic}}}


def test_recipe_switch_is_validated():
    assert load_config(raw=_cfg()).adapter.elastic.importance == "none"
    ok = load_config(raw=_cfg(importance="activation", base_widths={"mlp": [1.0, 0.5]}))
    assert ok.adapter.elastic.importance == "activation"
    with pytest.raises(ConfigError, match="importance.*none without base widths"):
        load_config(raw=_cfg(importance="magnitude"))
    with pytest.raises(ConfigError, match="importance"):
        load_config(raw=_cfg(importance="wanda", base_widths={"mlp": [1.0, 0.5]}))
    quantized = {**_cfg(importance="activation", base_widths={"mlp": [1.0, 0.5]}),
                 "model": {"quantization": {"method": "bitsandbytes"}}}
    with pytest.raises(ConfigError, match="importance.*4-bit"):
        load_config(raw=quantized)
    nncf = {**_cfg(importance="magnitude", nncf_config="lonas.json", search_space=None),
            "model": {"quantization": {"method": "nncf_int4"}}}
    with pytest.raises(ConfigError, match="importance.*none with nncf_int4"):
        load_config(raw=nncf)


def test_bloom_attention_is_refused():
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(hidden_size=32, n_layer=1, n_head=4, vocab_size=100))
    targets = [t for t in find_base_targets(model).values() if t.kind == "attention"]
    with pytest.raises(ConfigError, match="ALiBi"):
        importance.compute_order(model, targets, "magnitude")


@pytest.fixture(scope="module")
def ordered_run(tmp_path_factory, tiny_llama_dir):
    """2 steps of the tiny supernet with MLP and head widths, ordered by activation importance before training."""
    from dist_helpers import recipe
    from flexrank.run import train

    tmp = tmp_path_factory.mktemp("importance")
    run = tmp / "run"
    metrics = train(load_config(recipe(tmp, tiny_llama_dir, "elastic", max_steps=2), [
        f"training.output_dir={run}", "adapter.elastic.base_widths={mlp: [128, 96, 64], attention: [64, 32]}",
        "adapter.elastic.importance=activation", "adapter.elastic.importance_samples=12",
        "adapter.elastic.evaluate_subnets=[maximal, minimal]", "adapter.elastic.export_subnet=maximal",
        "eval.after=true", "eval.metrics=[loss]"]))
    return run, metrics


def test_run_records_the_order_and_reloads_the_trained_model(ordered_run):
    """A finished run reloaded (eval / export / search load it so) gives the held-out losses its training
    reported for each subnet: the saved order is applied to the freshly loaded base."""
    from flexrank.adapters.registry import load_run
    from flexrank.data import records as data_lib
    from flexrank.data.pipeline import load_data, tokenize
    from flexrank.evaluation.metrics import evaluate_run

    run, metrics = ordered_run
    assert metrics["importance"]["method"] == "activation" and metrics["importance"]["groups"] == 4
    assert 0 < metrics["importance"]["moved"] <= metrics["importance"]["units"] == 2 * (128 + 2)
    assert (run / "supernet" / importance.ORDER_FILE).is_file()
    finished = load_run(run)
    data = load_data(finished.cfg)
    eval_set = tokenize(finished.cfg, finished.tokenizer, data.eval, data.kind)
    for which in ("maximal", "minimal"):
        finished.method.activate(which)
        loss = evaluate_run(finished.cfg, finished.model, finished.tokenizer, data, eval_set,
                            data_lib.make_collator(finished.tokenizer, False))["loss"]
        assert loss == pytest.approx(metrics["subnets"][which]["loss"], abs=1e-5), which


def test_run_exports_map_to_the_stock_base_and_compact_is_the_prefix(ordered_run, tmp_path):
    """adapter/ (the maximal subnet) on the stock base with stock peft = the reloaded supernet; the compact export
    of the minimal subnet (prefix of the ordered weights) = the reloaded supernet's minimal subnet."""
    from transformers import AutoModelForCausalLM

    from flexrank.adapters.registry import load_run
    from flexrank.elastic.compact import export_compact

    run, _ = ordered_run
    finished = load_run(run)
    ids = torch.randint(0, 2000, (2, 10), generator=torch.Generator().manual_seed(4))
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(finished.cfg.model.name_or_path),
                                      run / "adapter").eval()
    finished.method.activate("maximal")
    supernet = finished.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, supernet(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        finished.method.activate("minimal")
        export_compact(supernet, finished.method.base_widths(), tmp_path / "compact")
        compact = AutoModelForCausalLM.from_pretrained(tmp_path / "compact").eval()
        assert compact.config.intermediate_size == 64 and compact.config.num_key_value_heads == 1
        torch.testing.assert_close(compact(input_ids=ids).logits, supernet(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_refuses_a_base_partitioned_at_load():
    """ZeRO-3 with zero3_init_flag partitions the base as it loads (each parameter a DeepSpeed shard, marked by
    ds_id): the order needs whole weights, so it is refused in one line naming the key."""
    model = _plain_llama()
    model.model.layers[0].mlp.up_proj.weight.ds_id = 0
    targets = list(find_base_targets(model).values())
    with pytest.raises(ConfigError, match="importance.*zero3_init_flag"):
        importance.compute_order(model, targets, "magnitude")


ORDERED = ["adapter.elastic.base_widths={mlp: [128, 96, 64], attention: [64, 32]}",
           "adapter.elastic.importance=activation", "adapter.elastic.importance_samples=12",
           "eval.before=true", "eval.metrics=[loss]"]


@pytest.fixture(scope="module")
def backend_runs(tmp_path_factory, tiny_llama_dir):
    """4 steps of the tiny ordered supernet (checkpoints at 2 and 4) on 1 process (in this process), ZeRO-3 and FSDP2
    (2 processes each), and the same supernet without ordering on 1 process."""
    from dist_helpers import recipe, run, train_args
    from flexrank.run import train

    tmp = tmp_path_factory.mktemp("ordered-backends")
    path = recipe(tmp, tiny_llama_dir, "elastic", max_steps=4, save_strategy="steps", save_steps=2)
    runs = {}
    for name, sets in (("plain", ORDERED[:1] + ORDERED[3:]), ("single", ORDERED)):
        train(load_config(path, [f"training.output_dir={tmp / name}", "training.gradient_accumulation_steps=2",
                                 *sets]))
        runs[name] = tmp / name
    for backend in ("zero3", "fsdp2"):
        run(train_args(path, tmp / backend, backend, *[a for s in ORDERED for a in ("--set", s)]))
        runs[backend] = tmp / backend
    return path, runs


def test_order_is_the_same_and_keeps_the_model_on_every_backend(backend_runs):
    """Measured once on whole weights before the engine shards them: the same order on 1 process, ZeRO-3 and FSDP2;
    the before-training loss (the maximal model, ordered) equals the unordered model's; training matches."""
    from dist_helpers import metrics

    _, runs = backend_runs
    plain, single = metrics(runs["plain"]), metrics(runs["single"])
    assert single["importance"]["moved"] > 0 and "importance" not in plain
    reference = importance.load_order(runs["single"] / "supernet")
    for backend in ("single", "zero3", "fsdp2"):
        m = metrics(runs[backend])
        assert m["train"]["world_size"] == (1 if backend == "single" else 2)
        assert m["before"]["loss"] == pytest.approx(plain["before"]["loss"], abs=1e-5), backend
        order = importance.load_order(runs[backend] / "supernet")
        assert order.keys() == reference.keys() and all(torch.equal(order[k], reference[k]) for k in order)
        assert m["train"]["losses"] == pytest.approx(single["train"]["losses"], abs=1e-5), backend


@pytest.mark.parametrize("source", ["single", "fsdp2"])
def test_resume_takes_the_order_from_the_checkpoint(backend_runs, tmp_path, monkeypatch, capsys, source):
    """Resumed from checkpoint-2 (of the same world size, or of 2 FSDP2 processes on 1): the order comes from the
    checkpoint, not a new measurement (which could differ with the machine's float reductions: the adapter would
    then not fit the base), and the run ends as the uninterrupted one did."""
    from dist_helpers import assert_same_adapter, metrics
    from flexrank.run import train

    path, runs = backend_runs

    def measured(*args, **kwargs):
        raise AssertionError("the order was measured again on resume")

    monkeypatch.setattr(importance, "compute_order", measured)
    out = tmp_path / "resumed"
    train(load_config(path, [f"training.output_dir={out}", "training.gradient_accumulation_steps=2", *ORDERED,
                             f"training.resume_from_checkpoint={runs[source] / 'checkpoint-2'}"]))
    assert "importance ordering (activation, from checkpoint-2)" in capsys.readouterr().out
    assert metrics(out)["train"]["losses"] == pytest.approx(metrics(runs[source])["train"]["losses"], abs=1e-5)
    assert_same_adapter(runs[source], out)


def test_a_state_of_another_order_is_refused(backend_runs):
    """A controller state written with one order cannot be loaded onto a base permuted by another."""
    from flexrank.adapters.registry import load_run

    _, runs = backend_runs
    finished = load_run(runs["single"])
    state = finished.method.controller.state_dict()
    flipped = {k: v.flip(0) for k, v in state["base_order"].items()}
    with pytest.raises(ValueError, match="channel order differs"):
        finished.method.controller.load_state_dict({**state, "base_order": flipped})
