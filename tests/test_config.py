"""Recipe validation: every bad input is one clear message naming the key, the value and what is allowed."""

import subprocess
import sys

import pytest

from flexrank.config import load_config
from flexrank.errors import ConfigError

BAD = [
    ({"adapter": {"rank": 8}}, ["adapter.rank", "unknown key", "'r'"]),
    ({"adapter": {"r": "eight"}}, ["adapter.r", "'eight'", "valid integer"]),
    ({"adapter": {"r": 0}}, ["adapter.r", "0", "greater than 0"]),
    ({"adapter": {"method": "lokr"}}, ["adapter.method", "'lokr'", "'elastic'"]),
    ({"model": {"dtype": "fp8"}}, ["model.dtype", "'fp8'", "'bfloat16'"]),
    ({"modle": {}}, ["modle", "did you mean model"]),
    ({"training": {"learnin_rate": 1e-4}}, ["training.learnin_rate", "did you mean learning_rate"]),
    ({"adapter": {"method": "elastic"}}, ["adapter.elastic", "method 'elastic'"]),
    ({"adapter": {"elastic": {"search_space": {}}}}, ["adapter.elastic", "adapter.method is 'lora'"]),
    ({"adapter": {"method": "elastic", "elastic": {}}}, ["adapter.elastic", "exactly one of"]),
    ({"adapter": {"method": "elastic", "elastic": {"search_space": {}, "export_subnet": "median"}}},
     ["subnet", "'median'", "heuristic"]),
    ({"model": {"quantization": {}}, "adapter": {"sparsity": {"ratio": 0.5}}}, ["adapter.sparsity", "4-bit"]),
    ({"model": {"quantization": {}}, "adapter": {"method": "miss"}}, ["adapter.method", "'miss'", "lora, dora"]),
    ({"model": {"quantization": {"bnb_4bit_quant_type": "int4"}}}, ["bnb_4bit_quant_type", "'int4'", "'nf4'"]),
    ({"adapter": {"sparsity": {"ratio": 1.5}}}, ["adapter.sparsity.ratio", "1.5", "less than 1"]),
    ({"data": {"task": None}}, ["data.task", "data.path"]),
    ({"data": {"task": "analogy", "path": "x.jsonl"}}, ["data.task", "'analogy'", "not both"]),
    ({"model": {"task_type": "seq_cls"}, "data": {"packing": True}}, ["data.packing", "causal_lm"]),
    ({"adapter": {"mini_r": 4}}, ["adapter.mini_r", "'miss'"]),
    ({"adapter": {"method": "sora", "sora": {"threshold": 0.01, "schedule": {"max_threshold": 0.001}}}},
     ["adapter.sora.schedule.max_threshold", "0.001", ">= adapter.sora.threshold"]),
    ({"adapter": {"sora": {}}}, ["adapter.sora", "method 'sora'", "'lora'"]),
    ({"adapter": {"method": "sora", "sora": {"prox": "hard"}}}, ["adapter.sora.prox", "'hard'", "'textbook'"]),
    ({"adapter": {"method": "sora", "sora": {"threshold": 0, "schedule": {"kind": "log_linear", "stages": 3}}}},
     ["adapter.sora.threshold", "log_linear"]),
    ({"adapter": {"method": "adalora", "r": 4, "adalora": {"target_r": 8}}}, ["adapter.adalora.target_r", "8", "<= adapter.r"]),
    ({"adapter": {"adalora": {}}}, ["adapter.adalora", "method 'adalora'"]),
    ({"adapter": {"method": "adalora", "adalora": {"beta1": 1.5}}}, ["adapter.adalora.beta1", "1.5"]),
    ({"distributed": {"backend": "zero4"}}, ["distributed.backend", "'zero4'", "fsdp2"]),
    ({"distributed": {"nproc": 2}}, ["distributed.backend", "'single'", "2 processes need"]),
    ({"distributed": {"nnodes": 2, "node_rank": 2, "backend": "ddp"}}, ["distributed.node_rank", "0 .. nnodes-1"]),
    ({"model": {"quantization": {"bnb_4bit_quant_storage": "uint8"}}, "distributed": {"backend": "fsdp2", "nproc": 2}},
     ["bnb_4bit_quant_storage", "'uint8'", "bfloat16"]),
    ({"adapter": {"method": "elastic", "elastic": {"search_space": {}, "sandwich": True}},
      "distributed": {"backend": "zero3", "nproc": 2}}, ["adapter.elastic.sandwich", "zero3"]),
    ({"adapter": {"method": "elastic", "elastic": {"search_space": {}, "distill": {"weight": 0}}}},
     ["adapter.elastic.distill.weight", "0", "greater than 0"]),
    ({"adapter": {"method": "elastic", "elastic": {"search_space": {}, "distill": {"weight": 1.5}}}},
     ["adapter.elastic.distill.weight", "1.5", "less than or equal to 1"]),
    ({"adapter": {"method": "elastic", "elastic": {"search_space": {}, "distill": {"temperature": -1}}}},
     ["adapter.elastic.distill.temperature", "-1", "greater than 0"]),
    ({"adapter": {"method": "elastic", "elastic": {"search_space": {}, "distill": {"alpha": 0.5}}}},
     ["adapter.elastic.distill.alpha", "unknown key", "weight"]),
    ({"model": {"liger_kernel": True},
      "adapter": {"method": "elastic", "elastic": {"search_space": {}, "distill": True}}},
     ["model.liger_kernel", "adapter.elastic.distill"]),
    ({"model": {"quantization": {"method": "nncf_int4"}},
      "adapter": {"method": "elastic", "elastic": {"search_space": {}, "distill": True}}},
     ["adapter.elastic.distill", "nncf_int4"]),
]


@pytest.mark.parametrize("raw, fragments", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_recipe_names_key_value_and_allowed(raw, fragments):
    with pytest.raises(ConfigError) as exc:
        load_config(raw=raw)
    for fragment in fragments:
        assert fragment in str(exc.value), (fragment, str(exc.value))


def test_defaults_are_the_embedded_run():
    cfg = load_config(raw={})
    assert cfg.model.name_or_path == "smollm2-135m-instruct" and cfg.data.task == "analogy"
    assert cfg.training["learning_rate"] == 1e-3 and cfg.training["max_steps"] == 60


def test_set_overrides_parse_yaml_values(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("adapter: {r: 4}\ntraining: {max_steps: 3}\n")
    cfg = load_config(recipe, ["training.learning_rate=1e-4", "adapter.target_modules=[q_proj, v_proj]",
                               "model.gradient_checkpointing=true"])
    assert cfg.training["learning_rate"] == 1e-4 and cfg.training["max_steps"] == 3
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"] and cfg.adapter.r == 4
    assert cfg.model.gradient_checkpointing is True


def test_bad_override_and_missing_recipe():
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        load_config(None, ["training.learning_rate"])
    with pytest.raises(ConfigError, match="an existing YAML file"):
        load_config("/nonexistent/recipe.yaml")


def test_cli_prints_one_line_and_exits_2_without_traceback(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("adapter:\n  method: elastic\n  elastic: {search_space: {}}\n  lora_alpah: 3\n")
    proc = subprocess.run([sys.executable, "-m", "flexrank", "check", str(recipe)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "flexrank: error: adapter.lora_alpah" in proc.stderr and "did you mean lora_alpha" in proc.stderr
    assert "Traceback" not in proc.stderr
