"""LoNAS elastic base widths: the activation masks equal a physically sliced model, both recipe forms and the LoNAS
NNCF JSON form are read, widths that do not fit the model are refused, and training samples and applies the same
widths (same losses) on 1 process, DDP, ZeRO-3 and FSDP2."""

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_llama_config
from dist_helpers import metrics, recipe, run, train_args
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaForCausalLM

from flexrank.elastic.base_masks import BaseMasks, find_base_targets
from flexrank.elastic.base_shape import LayerWidths
from flexrank.errors import ConfigError
from flexrank.adapters.rank_layer import rank_layers, register_rank_layer
from flexrank.elastic.search_space import base_groups_from_spec, space_from_nncf, space_from_spec

LAYER = "base_model.model.model.layers.{}"


def _lora_llama():
    """Tiny Llama (hidden 64, intermediate 128, 4 heads of 16, 2 key/value heads) with plain peft LoRA on every
    linear, lora_B random so that the adapters' cut matters too."""
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(LlamaForCausalLM(tiny_llama_config()), cfg).eval()


def _slice(linear, rows=None, cols=None):
    """Keep weight[:rows, :cols] of a peft LoRA Linear: the base and lora_B lose output rows, base and lora_A
    lose input columns (LoNAS cuts the first channels)."""
    def cut(module, r, c):
        w = module.weight.data
        module.weight = nn.Parameter(w[:r if r else w.shape[0], :c if c else w.shape[1]].clone())
    cut(linear.base_layer, rows, cols)
    if rows:
        cut(linear.lora_B["default"], rows, None)
    if cols:
        cut(linear.lora_A["default"], None, cols)


def test_mlp_and_head_masks_equal_sliced_model():
    model = _lora_llama()
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    targets = find_base_targets(model)
    assert targets[0, "mlp"].module == LAYER.format(0) + ".mlp.down_proj" and targets[0, "mlp"].size == 128
    assert targets[1, "attention"].size == 64 and targets[1, "attention"].unit == 32  # 2 heads share a kv head

    sliced = copy.deepcopy(model)
    mlp = sliced.base_model.model.model.layers[0].mlp
    _slice(mlp.gate_proj, rows=80), _slice(mlp.up_proj, rows=80), _slice(mlp.down_proj, cols=80)
    attn = sliced.base_model.model.model.layers[1].self_attn
    # Keep query heads 0-1 and the one key/value head they share (head_dim 16).
    _slice(attn.q_proj, rows=32), _slice(attn.k_proj, rows=16), _slice(attn.v_proj, rows=16)
    _slice(attn.o_proj, cols=32)

    masks = BaseMasks(model, {targets[0, "mlp"].module: 128, targets[1, "attention"].module: 64})
    with torch.no_grad():
        full = model(ids).logits
        masks.set_widths({targets[0, "mlp"].module: 80, targets[1, "attention"].module: 32})
        masked = model(ids).logits
        reference = sliced(ids).logits
    assert (masked - full).abs().max() > 1e-2  # the cut changes the model
    torch.testing.assert_close(masked, reference, atol=1e-5, rtol=1e-5)


def test_masks_under_gradient_checkpointing():
    """The recomputed forward sees the same mask: gradients equal those without checkpointing (and the cut
    columns of down_proj's lora_A get none)."""
    grads = []
    for checkpointing in (False, True):
        model = _lora_llama().train()
        targets = find_base_targets(model)
        BaseMasks(model, {t.module: t.size for t in targets.values()}).set_widths(
            {targets[0, "mlp"].module: 80, targets[1, "attention"].module: 32})
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)
    down_a = grads[1][LAYER.format(0) + ".mlp.down_proj.lora_A.default.weight"]
    assert down_a[:, 80:].abs().max() == 0 and down_a[:, :80].abs().max() > 0


def _rank_supernet():
    torch.manual_seed(0)
    cfg = register_rank_layer(LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "up_proj"]))
    model = get_peft_model(LlamaForCausalLM(tiny_llama_config()), cfg)
    return model, list(rank_layers(model)), find_base_targets(model)


def _node(layer: int, *path: str) -> str:
    return ("PeftModelForCausalLM/LoraModel[base_model]/LlamaForCausalLM[model]/LlamaModel[model]/ModuleList[layers]/"
            f"LlamaDecoderLayer[{layer}]/" + "/".join(path))


def _lonas_json(mlp_widths) -> str:
    """A LoNAS-style NNCF JSON for the 2-layer model: per layer one MLP group (base gate/up in LoNAS' self_linear
    form, up's lora_B) and one q/k/v rank group, a stage with width_indicator beyond the lists, a trailing comma."""
    groups, widths = [], []
    for i in range(2):
        groups.append([_node(i, "LlamaMLP[mlp]", f"Linear[{p}]", "NNCFUserSelfLinear[self_linear]", "linear_0")
                       for p in ("up_proj", "gate_proj")]
                      + [_node(i, "LlamaMLP[mlp]", "Linear[up_proj]", "ModuleDict[lora_B]", "NNCFLinear[default]",
                               "linear_0")])
        widths.append(mlp_widths)
        groups.append([_node(i, "LlamaAttention[self_attn]", f"Linear[{p}]", "ModuleDict[lora_A]",
                             "NNCFLinear[default]", "linear_0") for p in ("q_proj", "k_proj", "v_proj")])
        widths.append([8, 6])
    cfg = {"bootstrapNAS": {"training": {
        "elasticity": {"available_elasticity_dims": ["width"],
                       "width": {"overwrite_groups": groups, "overwrite_groups_widths": widths}},
        "schedule": {"list_stage_descriptions": [{"train_dims": ["width"], "epochs": 1, "width_indicator": 5}]}}}}
    text = json.dumps(cfg, indent=1)
    return re.sub(r"(linear_0\")(\s*\])", r"\1,\2", text, count=1)  # LoNAS' BLOOM JSON has trailing commas


def test_lonas_nncf_json_with_base_groups(tmp_path):
    model, names, targets = _rank_supernet()
    path = tmp_path / "lonas.json"
    path.write_text(_lonas_json([128, 112, 96, 80, 64]))
    with pytest.raises(json.JSONDecodeError):
        json.loads(path.read_text())  # the trailing comma is really there
    space = space_from_nncf(str(path), names, max_rank=8, base_targets=targets)
    mlp = {g.name: g for g in space.groups if g.base == "mlp"}
    assert sorted(mlp) == ["L0:mlp", "L1:mlp"]
    assert mlp["L1:mlp"].modules == (LAYER.format(1) + ".mlp.down_proj",) and mlp["L1:mlp"].widths == (128, 112, 96, 80, 64)
    assert space.stages[0].width_indicator == 5  # larger than the rank lists: all widths
    heuristic = space.heuristic()
    assert heuristic["L0:mlp"] == 96 and heuristic["L0:q_proj+k_proj+v_proj"] == 8
    assert space.base_widths(space.minimal()) == {0: LayerWidths(mlp=64), 1: LayerWidths(mlp=64)}
    assert space.module_widths(space.minimal())[LAYER.format(0) + ".self_attn.q_proj"] == 6
    sampled = {space.sample(3, s)["L1:mlp"] for s in range(40)}
    assert sampled == {128, 112, 96, 80, 64}


def test_recipe_form_fractions_shared_and_per_layer():
    _, names, targets = _rank_supernet()
    shared = base_groups_from_spec({"mlp": [1.0, 0.75, 0.5], "attention": [64, 32]}, targets)
    assert [(g.name, g.widths) for g in shared] == [("L0:mlp", (128, 96, 64)), ("L0:attention", (64, 32)),
                                                   ("L1:mlp", (128, 96, 64)), ("L1:attention", (64, 32))]
    per_layer = base_groups_from_spec({"mlp": {1: [128, 100]}}, targets)
    space = space_from_spec({"groups": [["q_proj"]], "widths": [8, 4]}, names, 8, base_groups=per_layer)
    assert space.maximal() == {"L0:q_proj": 8, "L1:q_proj": 8, "L1:mlp": 128}
    assert space.base_widths(space.minimal()) == {1: LayerWidths(mlp=100)}


@pytest.mark.parametrize("form", ["recipe", "nncf", "heads"])
def test_widths_that_do_not_fit_the_model_are_refused(tmp_path, form):
    _, names, targets = _rank_supernet()
    if form == "recipe":
        with pytest.raises(ConfigError, match=r"base_widths\.mlp: got 11008.*size 128.*L0:mlp"):
            base_groups_from_spec({"mlp": [11008, 5504]}, targets)
    elif form == "heads":  # not whole key/value groups of heads (unit 32)
        with pytest.raises(ConfigError, match=r"got 48.*multiple of 32.*L0:attention"):
            base_groups_from_spec({"attention": [64, 48]}, targets)
    else:
        path = tmp_path / "lonas.json"
        path.write_text(_lonas_json([11008, 9632, 8256]))
        with pytest.raises(ConfigError, match=r"overwrite_groups_widths\[0\]: got 11008.*size 128.*'L0:mlp'"):
            space_from_nncf(str(path), names, max_rank=8, base_targets=targets)


@pytest.fixture(scope="module")
def backend_runs(tmp_path_factory, tiny_llama_dir):
    """3 steps of the tiny supernet with MLP and head widths on every backend, and once without base widths."""
    tmp = tmp_path_factory.mktemp("base-widths")
    plain = recipe(tmp, tiny_llama_dir, "elastic", max_steps=3)
    raw = yaml.safe_load(plain.read_text())
    raw["adapter"]["elastic"]["base_widths"] = {"mlp": [128, 96, 64, 32], "attention": [64, 32]}
    path = tmp / "base_widths.yaml"
    path.write_text(yaml.safe_dump(raw))
    done = {"plain": tmp / "plain"}
    run(train_args(plain, done["plain"], "single"))
    for backend in ("single", "ddp", "zero3", "fsdp2"):
        done[backend] = tmp / backend
        run(train_args(path, done[backend], backend))
    return done


def _samples(out):
    return [json.loads(line)["subnet"] for line in (out / "elastic_samples.jsonl").read_text().splitlines()]


def test_same_widths_and_losses_on_every_backend(backend_runs):
    ref = backend_runs["single"]
    samples = _samples(ref)
    assert len(samples) == 3 and {s["L0:mlp"] for s in samples} | {s["L1:mlp"] for s in samples} != {128}
    # Same sampled ranks as without base widths (base groups draw after the rank groups), other losses: the
    # masks are applied in training.
    plain = _samples(backend_runs["plain"])
    assert [{k: v for k, v in s.items() if ":mlp" not in k and ":attention" not in k} for s in samples] == plain
    ref_losses = metrics(ref)["train"]["losses"]
    assert metrics(backend_runs["plain"])["train"]["losses"][1:] != pytest.approx(ref_losses[1:], abs=1e-4)
    for backend in ("ddp", "zero3", "fsdp2"):
        out = backend_runs[backend]
        assert metrics(out)["train"]["backend"] == backend and metrics(out)["train"]["world_size"] == 2
        assert _samples(out) == samples
        assert metrics(out)["train"]["losses"] == pytest.approx(ref_losses, abs=1e-5)


def test_bert_head_and_intermediate_cut_equal_sliced_encoder():
    """Encoder form (BERT / MiniLM): trailing heads of layer 1 and the intermediate width of layer 0."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=96, vocab_size=100)).eval()
    targets = find_base_targets(model)
    assert targets[1, "attention"].module == "bert.encoder.layer.1.attention.output.dense"
    assert targets[0, "mlp"].module == "bert.encoder.layer.0.output.dense" and targets[0, "mlp"].unit == 1
    sliced = copy.deepcopy(model)
    attention = sliced.bert.encoder.layer[1].attention
    for linear in (attention.self.query, attention.self.key, attention.self.value):
        linear.weight, linear.bias = nn.Parameter(linear.weight[:32].clone()), nn.Parameter(linear.bias[:32].clone())
    attention.output.dense.weight = nn.Parameter(attention.output.dense.weight[:, :32].clone())
    attention.self.num_attention_heads, attention.self.all_head_size = 2, 32
    layer0 = sliced.bert.encoder.layer[0]
    up = layer0.intermediate.dense
    up.weight, up.bias = nn.Parameter(up.weight[:40].clone()), nn.Parameter(up.bias[:40].clone())
    layer0.output.dense.weight = nn.Parameter(layer0.output.dense.weight[:, :40].clone())

    masks = BaseMasks(model, {targets[1, "attention"].module: 64, targets[0, "mlp"].module: 96})
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        masks.set_widths({targets[1, "attention"].module: 32, targets[0, "mlp"].module: 40})
        masked = model(ids).logits
        reference = sliced(ids).logits
    assert (masked - full).abs().max() > 1e-4
    torch.testing.assert_close(masked, reference, atol=1e-5, rtol=1e-5)


BERT_NODE = ("PeftModelForSequenceClassification/LoraModel[base_model]/BertForSequenceClassification[model]/"
             "BertModel[bert]/BertEncoder[encoder]/ModuleList[layer]/BertLayer[{}]/")


def _meta_bert(hidden=64, layers=2, heads=4, intermediate=96):
    """A BERT classifier on the meta device with LoRA (flexrank's rank layer) on query and value, as LoNAS's GLUE
    runs adapt it."""
    from accelerate import init_empty_weights
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=intermediate, vocab_size=100 if hidden == 64 else 30522, num_labels=2)
    with init_empty_weights():
        model = get_peft_model(BertForSequenceClassification(config), register_rank_layer(
            LoraConfig(r=8, target_modules=["query", "value"], task_type="SEQ_CLS")))
    return model, list(rank_layers(model)), find_base_targets(model)


def _bert_json(dynamic: list[str]) -> dict:
    """LoNAS's GLUE form for the tiny BERT: layer 1's query/key/value width group (base weights and lora_B, as the
    RTE JSON writes them), a q/v rank group per layer, and `add_dynamic_inputs`."""
    attention = BERT_NODE.format(1) + "BertAttention[attention]/BertSelfAttention[self]/"
    groups = [[attention + "Linear[query]/NNCFUserSelfLinear[self_linear]/linear_0",
               attention + "Linear[query]/ModuleDict[lora_B]/NNCFLinear[default]/linear_0",
               attention + "NNCFLinear[key]/linear_0",
               attention + "Linear[value]/NNCFUserSelfLinear[self_linear]/linear_0"]]
    groups += [[BERT_NODE.format(i) + f"BertAttention[attention]/BertSelfAttention[self]/Linear[{p}]/"
                "ModuleDict[lora_A]/NNCFLinear[default]/linear_0" for p in ("query", "value")] for i in range(2)]
    width = {"overwrite_groups": groups, "overwrite_groups_widths": [[64, 32], [8, 4, 2], [8, 4, 2]],
             "add_dynamic_inputs": dynamic}
    return {"bootstrapNAS": {"training": {"elasticity": {"available_elasticity_dims": ["width"], "width": width}}}}


def _attention_output(layer: int) -> str:
    return BERT_NODE.format(layer) + "BertAttention[attention]/BertSelfOutput[output]/NNCFLinear[dense]/linear_0"


def test_add_dynamic_inputs_of_the_shipped_lonas_rte_config():
    """LoNAS's BERT-base RTE JSON as shipped: the 12 attention-output dense inputs it lists follow their layer's
    attention width group."""
    model, names, targets = _meta_bert(hidden=768, layers=12, heads=12, intermediate=3072)
    path = Path(__file__).resolve().parent / "data" / "lonas" / "nncf_lonas_bert_base_rte.json"
    space = space_from_nncf(path, names, max_rank=8, base_targets=targets)
    layer = "base_model.model.bert.encoder.layer.{}.attention.output.dense"
    assert space.dynamic_inputs == {layer.format(i): f"L{i}:attention" for i in range(12)}
    assert space.dynamic_input_widths(space.heuristic())[layer.format(10)] == 704  # [768, 704, 192]
    assert space.dynamic_input_widths(space.minimal())[layer.format(9)] == 192     # [768, 192]


def test_add_dynamic_inputs_read_and_refused_in_one_line():
    _, names, targets = _meta_bert()
    space = space_from_nncf(_bert_json([_attention_output(1)]), names, max_rank=8, base_targets=targets)
    dense = "base_model.model.bert.encoder.layer.1.attention.output.dense"
    assert space.dynamic_inputs == {dense: "L1:attention"}
    assert space.dynamic_input_widths({**space.maximal(), "L1:attention": 32}) == {dense: 32}
    key = r"width\.add_dynamic_inputs\[1\]"
    # Layer 0 has no attention width group: nothing would set that input's width.
    with pytest.raises(ConfigError, match=key + r".*BertLayer\[0\].*attention-output projection.*L1:attention"):
        space_from_nncf(_bert_json([_attention_output(1), _attention_output(0)]), names, 8, base_targets=targets)
    lora = BERT_NODE.format(1) + "BertAttention[attention]/BertSelfAttention[self]/Linear[query]/ModuleDict[lora_A]/" \
        "NNCFLinear[default]/linear_0"
    with pytest.raises(ConfigError, match=key + r".*lora_A"):
        space_from_nncf(_bert_json([_attention_output(1), lora]), names, 8, base_targets=targets)
    with pytest.raises(ConfigError, match=r"width\.add_dynamic_inputs: got 'x'"):
        space_from_nncf(_bert_json("x"), names, 8, base_targets=targets)
