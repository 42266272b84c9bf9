"""Elastic-rank search spaces: flexrank's YAML form, NNCF/Shears JSON import, deterministic sampling, errors."""

import json

import pytest

from flexrank.errors import ConfigError
from flexrank.elastic.search_space import Group, SearchSpace, Stage, space_from_nncf, space_from_spec

LAYERS = 4
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# Adapted-module names of a 4-layer Llama wrapped by peft (get_peft_model).
NAMES = [f"base_model.model.model.layers.{i}.self_attn.{p}" for i in range(LAYERS) for p in ATTN] + \
        [f"base_model.model.model.layers.{i}.mlp.{p}" for i in range(LAYERS) for p in MLP]
SHEARS_SPEC = {"groups": [["q_proj", "k_proj", "v_proj"], ["up_proj"], ["down_proj"]], "widths": [32, 24, 16]}

# The content of Shears/nncf_config/nncf_shears_llama.json (IntelLabs/Hardware-Aware-Automated-Machine-Learning);
# only its five node names are written from one template here.
_NODE = ("{{re}}PeftModelForCausalLM/LoraModel[base_model]/LlamaForCausalLM[model]/LlamaModel[model]/"
         "ModuleList[layers]/LlamaDecoderLayer[{{*}}]/{block}/Linear[{proj}]/ModuleDict[lora_A]/"
         "NNCFLinear[default]/linear_0")
SHEARS_NNCF_JSON = """{
    "input_info": [
        {"sample_size": [1, 256], "type": "long", "keyword": "input_ids"},
        {"sample_size": [1, 256], "type": "long", "keyword": "attention_mask"}
    ],
    "bootstrapNAS": {
        "training": {
            "algorithm": "progressive_shrinking",
            "frozen_layers_allowed": true,
            "progressivity_of_elasticity": ["width"],
            "batchnorm_adaptation": {"num_bn_adaptation_samples": 0},
            "schedule": {
                "list_stage_descriptions": [
                    {"train_dims": ["width"], "epochs": -1, "depth_indicator": 1, "width_indicator": 5, "init_lr": -1, "epochs_lr": -1, "sample_rate": 1}
                ]
            },
            "elasticity": {
                "available_elasticity_dims": ["width"],
                "width": {
                    "overwrite_groups": [
                        [
                            "%s",
                            "%s",
                            "%s"
                        ],
                        [
                            "%s"
                        ],
                        [
                            "%s"
                        ]
                    ],
                    "overwrite_groups_widths": [
                        [32, 24, 16], [32, 24, 16], [32, 24, 16]
                    ]
                }
            }
        }
    }
}
""" % tuple(_NODE.format(block=b, proj=p) for b, p in [("LlamaAttention[self_attn]", "q_proj"),
                                                        ("LlamaAttention[self_attn]", "k_proj"),
                                                        ("LlamaAttention[self_attn]", "v_proj"),
                                                        ("LlamaMLP[mlp]", "up_proj"),
                                                        ("LlamaMLP[mlp]", "down_proj")])


def _expanded(cfg: dict, num_layers: int) -> dict:
    """What Shears' parse_nncf_config writes for a model: every template group once per layer, no {re}/{*}."""
    cfg = json.loads(json.dumps(cfg))
    width = cfg["bootstrapNAS"]["training"]["elasticity"]["width"]
    groups, widths = [], []
    for group, w in zip(width["overwrite_groups"], width["overwrite_groups_widths"]):
        for i in range(num_layers):
            groups.append([n.replace("{re}", "").replace("{*}", str(i)) for n in group])
            widths.append(w)
    width["overwrite_groups"], width["overwrite_groups_widths"] = groups, widths
    return cfg


def _shears_groups_expected():
    expected = {}
    for kind, projs, block in [("q_proj+k_proj+v_proj", ["q_proj", "k_proj", "v_proj"], "self_attn"),
                               ("up_proj", ["up_proj"], "mlp"), ("down_proj", ["down_proj"], "mlp")]:
        for i in range(LAYERS):
            expected[f"L{i}:{kind}"] = tuple(f"base_model.model.model.layers.{i}.{block}.{p}" for p in projs)
    return expected


def _raises(fn, *fragments):
    with pytest.raises(ConfigError) as info:
        fn()
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    return info.value


# ----------------------------------------------------------------------------- YAML form

def test_spec_per_layer_expands_shears_groups():
    space = space_from_spec(SHEARS_SPEC, NAMES, max_rank=32)
    assert len(space.groups) == 12
    assert {g.name: g.modules for g in space.groups} == _shears_groups_expected()
    assert all(g.widths == (32, 24, 16) for g in space.groups)
    # Group-major then layer order, as Shears' parse_nncf_config expands its templates.
    assert [g.name for g in space.groups[:5]] == [f"L{i}:q_proj+k_proj+v_proj" for i in range(4)] + ["L0:up_proj"]
    # One stage over all widths by default; o_proj/gate_proj are adapted but not elastic.
    assert space.stages == (Stage(steps=None, epochs=None, width_indicator=3),)
    assert len(space.module_widths(space.maximal())) == 20


def test_spec_across_layers_regex_and_widths_per_group():
    spec = {"groups": [["{re}\\.(q|v)_proj$"], "down_proj"], "widths": [[16, 8], [32, 16, 4]], "per_layer": False}
    space = space_from_spec(spec, NAMES, max_rank=32)
    assert [(g.name, len(g.modules), g.widths) for g in space.groups] == [
        ("q_proj+v_proj", 8, (16, 8)), ("down_proj", 4, (32, 16, 4))]


def test_one_rank_per_layer_puts_every_adapted_module_of_a_layer_in_one_group():
    space = space_from_spec({"one_rank_per_layer": True, "widths": [16, 8, 4]}, NAMES, max_rank=16)
    assert [g.name for g in space.groups] == [f"L{i}:{'+'.join(ATTN + MLP)}" for i in range(LAYERS)]
    assert all(len(g.modules) == 7 and all(f".layers.{i}." in m for m in g.modules)
               for i, g in enumerate(space.groups))


def test_maximal_minimal_heuristic():
    space = space_from_spec(SHEARS_SPEC, NAMES, max_rank=32)
    assert set(space.maximal().values()) == {32}
    assert set(space.minimal().values()) == {16}
    assert set(space.heuristic().values()) == {24}
    # LoNAS/Shears median rule takes the larger middle value of an even-length list.
    even = SearchSpace((Group("a", ("m",), (32, 28)), Group("b", ("n",), (8, 4, 2)), Group("c", ("o",), (768, 384))),
                       (Stage(None, None, 2),))
    assert even.heuristic() == {"a": 32, "b": 4, "c": 768}


def test_validate_subnet_and_module_widths():
    space = space_from_spec(SHEARS_SPEC, NAMES, max_rank=32)
    config = space.heuristic() | {"L2:up_proj": 16}
    widths = space.module_widths(config)
    assert widths["base_model.model.model.layers.2.mlp.up_proj"] == 16
    assert widths["base_model.model.model.layers.2.self_attn.k_proj"] == 24
    _raises(lambda: space.validate_subnet(config | {"L9:up_proj": 16}), "subnet", "L9:up_proj", "a group name")
    _raises(lambda: space.validate_subnet(config | {"L1:down_proj": 20}), "subnet.L1:down_proj", "20", "[32, 24, 16]")
    _raises(lambda: space.validate_subnet({"L0:up_proj": 32}), "subnet.L0:q_proj+k_proj+v_proj", "missing")


# ----------------------------------------------------------------------------- NNCF / Shears JSON

def test_nncf_import_of_shears_template(tmp_path):
    path = tmp_path / "nncf_shears_llama.json"
    path.write_text(SHEARS_NNCF_JSON)
    space = space_from_nncf(path, NAMES, max_rank=32)
    assert {g.name: g.modules for g in space.groups} == _shears_groups_expected()
    assert all(g.widths == (32, 24, 16) for g in space.groups)
    # -1 means "from the training arguments"; NNCF clamps width_indicator 5 to the 3 widths there are.
    assert space.stages == (Stage(steps=None, epochs=None, width_indicator=3, sample_rate=1),)
    assert space.heuristic() == dict.fromkeys(_shears_groups_expected(), 24)
    assert space.maximal() == dict.fromkeys(_shears_groups_expected(), 32)
    assert space.minimal() == dict.fromkeys(_shears_groups_expected(), 16)


def test_nncf_import_of_expanded_config_matches_template():
    cfg = json.loads(SHEARS_NNCF_JSON)
    stage = cfg["bootstrapNAS"]["training"]["schedule"]["list_stage_descriptions"][0]
    stage.update(epochs=3, init_lr=3e-4, epochs_lr=3)
    expanded = _expanded(cfg, LAYERS)
    assert len(expanded["bootstrapNAS"]["training"]["elasticity"]["width"]["overwrite_groups"]) == 12
    space = space_from_nncf(expanded, NAMES, max_rank=32)
    assert space.groups == space_from_nncf(cfg, NAMES, max_rank=32).groups
    assert space.stages == (Stage(steps=None, epochs=3, width_indicator=3, init_lr=3e-4, epochs_lr=3),)


def test_nncf_matches_module_names_without_peft_prefix():
    bare = [n.removeprefix("base_model.model.") for n in NAMES]
    space = space_from_nncf(json.loads(SHEARS_NNCF_JSON), bare, max_rank=32)
    assert space.groups[0].modules == tuple(f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj"))


def test_nncf_errors():
    base = json.loads(SHEARS_NNCF_JSON)

    def edit(fn):
        cfg = json.loads(json.dumps(base))
        fn(cfg["bootstrapNAS"]["training"])
        return lambda: space_from_nncf(cfg, NAMES, max_rank=32)

    width_key = "bootstrapNAS.training.elasticity.width"
    stage_key = "bootstrapNAS.training.schedule.list_stage_descriptions[0]"
    _raises(edit(lambda t: t["elasticity"]["width"].update(width_step=8)),
            f"{width_key}.width_step", "overwrite_groups")
    _raises(edit(lambda t: t["schedule"]["list_stage_descriptions"][0].update(warmup=1)),
            f"{stage_key}.warmup", "sample_rate")
    _raises(edit(lambda t: t["schedule"]["list_stage_descriptions"][0].update(train_dims=["width", "depth"])),
            f"{stage_key}.train_dims", "depth")
    _raises(edit(lambda t: t["schedule"]["list_stage_descriptions"][0].update(reorg_weights=True)),
            f"{stage_key}.reorg_weights", "True")
    _raises(edit(lambda t: t["schedule"]["list_stage_descriptions"][0].update(width_indicator=0)),
            f"{stage_key}.width_indicator", "0")
    _raises(edit(lambda t: t["elasticity"]["width"]["overwrite_groups_widths"].pop()),
            f"{width_key}.overwrite_groups_widths", "2 lists", "3 groups")
    _raises(edit(lambda t: t["elasticity"]["width"]["overwrite_groups_widths"].__setitem__(1, [64, 32])),
            f"{width_key}.overwrite_groups_widths[1]", "[64, 32]", "r=32")
    # A LoNAS base-width node (not a lora_A) needs the model's base targets (tests/test_base_widths.py reads them).
    base_node = ("PeftModelForCausalLM/LoraModel[base_model]/LlamaForCausalLM[model]/LlamaModel[model]/"
                 "ModuleList[layers]/LlamaDecoderLayer[0]/LlamaMLP[mlp]/Linear[gate_proj]/"
                 "SelfLinear[self_linear]/linear_0")
    _raises(edit(lambda t: t["elasticity"]["width"]["overwrite_groups"].__setitem__(1, [base_node])),
            f"{width_key}.overwrite_groups[1]", "SelfLinear[self_linear]", "base widths are not supported here")
    # A group must be all-templated or not at all.
    fixed = base["bootstrapNAS"]["training"]["elasticity"]["width"]["overwrite_groups"][1][0].replace("{*}", "0")
    _raises(edit(lambda t: t["elasticity"]["width"]["overwrite_groups"][0].append(fixed)),
            f"{width_key}.overwrite_groups[0]", "same layer")
    # A template for a module that has no adapter.
    gate = base["bootstrapNAS"]["training"]["elasticity"]["width"]["overwrite_groups"][1][0].replace("up_proj", "gate")
    _raises(edit(lambda t: t["elasticity"]["width"]["overwrite_groups"][1].__setitem__(0, gate)),
            f"{width_key}.overwrite_groups[1][0]", "Linear[gate]", "matches no module")
    _raises(lambda: space_from_nncf("/nonexistent/nncf.json", NAMES, 32), "nncf_config", "/nonexistent/nncf.json")


# ----------------------------------------------------------------------------- sampling and stages

def test_sample_is_a_function_of_seed_and_step():
    space = space_from_spec(SHEARS_SPEC, NAMES, max_rank=32)
    assert space.sample(7, 3) == space.sample(7, 3)
    assert space_from_spec(SHEARS_SPEC, NAMES, max_rank=32).sample(7, 3) == space.sample(7, 3)  # another "process"
    configs = [space.sample(7, step) for step in range(20)]
    assert len({tuple(c.values()) for c in configs}) > 1
    assert space.sample(8, 3) != space.sample(7, 3)
    assert all(space.validate_subnet(c) == c for c in configs)
    # Over 20 steps x 12 groups every width shows up when all may be sampled.
    assert {w for c in configs for w in c.values()} == {32, 24, 16}


def test_sampling_is_uniform_per_group_and_independent_across_groups():
    """Statistics that hold for any correct sampler (not values taken from the sampler): 300 steps x 12 groups.
    Each width has probability 1/3 (count 1200 +- 3 sigma = 3 x 26); groups are not drawn together."""
    space = space_from_spec(SHEARS_SPEC, NAMES, max_rank=32)
    configs = [space.sample(11, step) for step in range(300)]
    counts = {w: sum(list(c.values()).count(w) for c in configs) for w in (32, 24, 16)}
    assert all(abs(n - 1200) < 80 for n in counts.values()), counts
    same = sum(c["L0:up_proj"] == c["L0:down_proj"] for c in configs)  # 1/3 of 300 = 100 +- 3 x 8
    assert 75 < same < 125, same
    per_group = [sum(c[g] == 32 for c in configs) for g in configs[0]]  # 100 +- 3 x 8 for every group
    assert all(70 < n < 130 for n in per_group), per_group
    narrow = [space.sample(11, step, width_indicator=2) for step in range(100)]  # 1/2 each of the largest two
    assert 540 < sum(list(c.values()).count(32) for c in narrow) < 660


def test_width_indicator_restricts_to_the_largest_widths():
    space = space_from_spec(SHEARS_SPEC, NAMES, max_rank=32)
    drawn = {w for step in range(50) for w in space.sample(0, step, width_indicator=2).values()}
    assert drawn == {32, 24}
    assert {w for step in range(5) for w in space.sample(0, step, width_indicator=1).values()} == {32}


def test_stages_and_sample_rate():
    spec = SHEARS_SPEC | {"stages": [{"steps": 10, "width_indicator": 1},
                                     {"epochs": 2, "width_indicator": 2, "sample_rate": 4},
                                     {"width_indicator": 3, "sample_rate": 3}]}
    space = space_from_spec(spec, NAMES, max_rank=32)
    steps_per_epoch = 5  # stage 0: steps 0-9, stage 1: 10-19 (2 epochs), stage 2: 20 onwards
    assert [space.stage_at(s, steps_per_epoch).width_indicator for s in (0, 9, 10, 19, 20, 10**6)] == [1, 1, 2, 2, 3, 3]
    assert all(space.config_for_step(1, s, steps_per_epoch) == space.maximal() for s in range(10))
    configs = {s: space.config_for_step(1, s, steps_per_epoch) for s in range(10, 40)}
    for s, config in configs.items():
        start, rate = (10, 4) if s < 20 else (20, 3)
        # Constant within a sample_rate window, counted from the stage's start.
        assert config == configs[s - (s - start) % rate]
    windows = [configs[s] for s in (10, 14, 18)] + [configs[s] for s in range(20, 40, 3)]
    assert all(tuple(a.values()) != tuple(b.values()) for a, b in zip(windows, windows[1:]))  # a new draw each
    assert {w for s in range(10, 20) for w in configs[s].values()} == {32, 24}  # stage 1: the largest two
    assert {w for s in range(20, 40) for w in configs[s].values()} == {32, 24, 16}  # stage 2: all three
    # A pure function of (seed, step): another instance ("process") gives the same; another seed does not.
    again = space_from_spec(spec, NAMES, max_rank=32)
    assert all(again.config_for_step(1, s, steps_per_epoch) == c for s, c in configs.items())
    assert any(space.config_for_step(2, s, steps_per_epoch) != c for s, c in configs.items())


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("spec, fragments", [
    (SHEARS_SPEC | {"widths": [[32, 24], [16]]}, ["search_space.widths", "2 lists", "3 groups"]),
    (SHEARS_SPEC | {"widths": [64, 32]}, ["search_space.widths", "[64, 32]", "r=32"]),
    (SHEARS_SPEC | {"widths": [16, 24, 32]}, ["search_space.widths", "[16, 24, 32]", "descending"]),
    (SHEARS_SPEC | {"widths": [16, 8, 0]}, ["search_space.widths", "[16, 8, 0]", "positive"]),
    (SHEARS_SPEC | {"widths": [[32, 24], [16, 16], [8]]}, ["search_space.widths[1]", "[16, 16]", "descending"]),
    (SHEARS_SPEC | {"groups": [["q_proj", "qq_proj"]]}, ["search_space.groups[0][1]", "qq_proj", "matches no module"]),
    (SHEARS_SPEC | {"groups": [["{re}(unclosed"]]}, ["search_space.groups[0][0]", "(unclosed", "regular expression"]),
    (SHEARS_SPEC | {"groups": [["q_proj", "v_proj"], ["{re}layers\\.3\\.self_attn\\.v_proj"]]},
     ["search_space.groups[1]", "layers.3.self_attn.v_proj", "search_space.groups[0]"]),
    (SHEARS_SPEC | {"granularity": "layer"}, ["search_space.granularity", "layer", "per_layer"]),
    (SHEARS_SPEC | {"stages": [{"steps": 10, "width_indicator": 0}, {}]},
     ["search_space.stages[0].width_indicator", "0"]),
    (SHEARS_SPEC | {"stages": [{"width_indicator": 4}]}, ["search_space.stages[0].width_indicator", "4", "[1, 3]"]),
    (SHEARS_SPEC | {"stages": [{"width_indicator": 2, "lr": 1e-4}]}, ["search_space.stages[0].lr", "width_indicator"]),
    (SHEARS_SPEC | {"stages": [{"width_indicator": 2}, {"width_indicator": 3}]},
     ["search_space.stages[0]", "steps or epochs"]),
    (SHEARS_SPEC | {"stages": [{"steps": 5, "epochs": 1}]}, ["search_space.stages[0]", "not both"]),
    (SHEARS_SPEC | {"one_rank_per_layer": True}, ["search_space.one_rank_per_layer", "no groups"]),
])
def test_bad_spec(spec, fragments):
    _raises(lambda: space_from_spec(spec, NAMES, max_rank=32), *fragments)


def test_bad_sampling_arguments():
    space = space_from_spec(SHEARS_SPEC, NAMES, max_rank=32)
    _raises(lambda: space.sample(-1, 0), "seed", "-1")
    _raises(lambda: space.sample(0, 0, width_indicator=0), "width_indicator", "0")
    with_epochs = space_from_spec(SHEARS_SPEC | {"stages": [{"epochs": 1}, {}]}, NAMES, max_rank=32)
    _raises(lambda: with_epochs.config_for_step(0, 3, 0), "steps_per_epoch", "0")
    _raises(lambda: Group("g", ("m",), (8, 8)), "group 'g'.widths", "(8, 8)")
    _raises(lambda: SearchSpace((Group("a", ("m",), (8,)), Group("b", ("m",), (4,))), (Stage(None, None, 1),)),
            "search_space.groups", "'m'", "'a'", "'b'")
