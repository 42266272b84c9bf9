"""nncf runs end to end: the post-training INT4 baseline (float LoRA, merged, then nncf compress_weights), and
`flexrank eval` / `flexrank export` of nncf runs (QAT + NLS and post-training)."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("nncf")

from dist_helpers import metrics, recipe, run, train_args  # noqa: E402

from flexrank.adapters import nncf as quant_nncf  # noqa: E402
from flexrank.config import load_config  # noqa: E402
from flexrank.errors import ConfigError  # noqa: E402
from test_safety import plant_pickle_payload  # noqa: E402

GROUP = 32
NLS = {"search_space": {"one_rank_per_layer": True, "widths": [8, 6, 4]}, "evaluate_subnets": ["heuristic"],
       "export_subnet": "heuristic"}


def test_post_training_compression_packs_the_merged_weights_to_int4_per_group(tiny_llama):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)  # a trained-looking adapter, so merging it matters
    up = peft_model.base_model.model.model.layers[0].mlp.up_proj
    merged = (up.base_layer.weight + up.lora_B["default"].weight @ up.lora_A["default"].weight
              * up.scaling["default"]).detach()
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    cfg = load_config(raw={"model": {"quantization": {"method": "nncf_int4_ptq", "group_size": GROUP}},
                           "adapter": {"method": "lora", "r": 4}})
    int4 = quant_nncf.compress_merged(peft_model, cfg, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    packed = int4.model.layers[0].mlp.up_proj.weight
    assert packed.dtype == torch.uint8 and packed.numel() == merged.numel() // 2  # two INT4 values per byte
    decompress = dict(quant_nncf.hook_storage(int4).named_hooks())["post_hooks.model:layers:0:mlp:up_proj:weight__0.0"]
    with torch.no_grad():
        dequantized = decompress(packed).float().reshape(merged.shape[0], -1, GROUP)
    groups = merged.reshape(merged.shape[0], -1, GROUP)
    step = (groups.amax(-1) - groups.amin(-1)) / 15  # asymmetric INT4: 16 levels from each group's min to max
    for row, g in zip(dequantized.flatten(0, 1), groups.flatten(0, 1)):
        assert 2 <= len(row.unique()) <= 16
    # Every weight within half a level of the merged float weight (+1% for the float16 scales).
    assert ((dequantized - groups).abs() <= step.unsqueeze(-1) * 0.51 + 1e-6).all()


@pytest.mark.parametrize("mode, backup", [("int4_asym", "none"), ("int4_sym", "int8")])
def test_the_saved_int4_model_reloads_bit_for_bit_without_pickle(mode, backup, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    from conftest import tiny_llama_config
    from flexrank.models.assets import smollm2_dir

    config = tiny_llama_config()
    config.tie_word_embeddings = True  # SmolLM2's layout: one tensor for embeddings and lm_head
    torch.manual_seed(0)
    peft_model = get_peft_model(LlamaForCausalLM(config).eval(), LoraConfig(r=4, target_modules="all-linear"))
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    cfg = load_config(raw={"model": {"quantization": {"method": "nncf_int4_ptq", "group_size": GROUP, "mode": mode,
                                                      "backup": backup}}, "adapter": {"method": "lora", "r": 4}})
    int4 = quant_nncf.compress_merged(peft_model, cfg, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    info = quant_nncf.save_int4(int4, AutoTokenizer.from_pretrained(smollm2_dir()), tmp_path)
    assert info == {"int4_model": str(tmp_path), "int4_model_bytes": (tmp_path / "model.safetensors").stat().st_size}
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.bin"))  # no pickle container written
    loaded = quant_nncf.load_int4(tmp_path)
    assert loaded.model.layers[0].mlp.up_proj.weight.dtype == torch.uint8  # still packed
    if backup == "int8":
        assert loaded.lm_head.weight.dtype == torch.uint8 and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, int4(input_ids=ids).logits)
    assert loaded.generation_config.to_dict() == int4.generation_config.to_dict()
    # Tampered or torn folders are refused, not loaded half-right.
    spec_file = tmp_path / "int4_config.json"
    spec = json.loads(spec_file.read_text())
    spec_file.write_text(json.dumps({**spec, "decompressors": spec["decompressors"][1:]}))  # one hook dropped
    with pytest.raises(ConfigError, match="Unexpected key.*_scale"):
        quant_nncf.load_int4(tmp_path)
    spec_file.write_text(json.dumps(spec))
    quant_nncf.load_int4(tmp_path)  # loads again once restored
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes()[:-1] + b"\0")
    with pytest.raises(ConfigError, match="not the file int4_config.json was written for"):
        quant_nncf.load_int4(tmp_path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir):
    """A 3-step post-training run and a 3-step QAT + NLS run on the tiny Llama, evaluated after training."""
    tmp = tmp_path_factory.mktemp("nncf_runs")
    path = recipe(tmp, tiny_llama_dir, "lora", max_steps=3)
    common = ("--set", "eval.after=true", "--set", "data.eval_size=4", "--set", "eval.max_new_tokens=4")
    quant = "model.quantization={method: %s, group_size: 32}"
    outs = {"ptq": tmp / "ptq", "qat": tmp / "qat"}
    run(train_args(path, outs["ptq"], "single", *common, "--set", quant % "nncf_int4_ptq", match_two_processes=False))
    run(train_args(path, outs["qat"], "single", *common, "--set", quant % "nncf_int4", "--set", "adapter.method=elastic",
                   "--set", "adapter.r=8", "--set", f"adapter.elastic={NLS}", match_two_processes=False))
    return outs


def flexrank(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flexrank", *args], capture_output=True, text=True, timeout=300)


def logits(folder, ids):
    with torch.no_grad():
        return quant_nncf.load_int4(folder)(input_ids=ids).logits


def test_post_training_run_saves_its_int4_model_and_eval_reproduces_its_metrics(runs):
    m = metrics(runs["ptq"])
    model_file = runs["ptq"] / "int4_model" / "model.safetensors"
    assert m["export"]["int4_model_bytes"] == model_file.stat().st_size
    assert (runs["ptq"] / "adapter" / "adapter_model.safetensors").is_file()  # the float LoRA stays available
    assert m["after"]["loss"] != m["after_float"]["loss"]  # "after" is the INT4 model, not the float one
    done = run([sys.executable, "-m", "flexrank", "eval", str(runs["ptq"])])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loss"] == pytest.approx(m["after"]["loss"], abs=1e-5)
    assert result["exact_match"] == m["after"]["exact_match"]


def test_qat_run_eval_reproduces_its_metrics_and_export_writes_the_chosen_subnet(runs, tmp_path):
    m = metrics(runs["qat"])
    done = run([sys.executable, "-m", "flexrank", "eval", str(runs["qat"]), "--subnet", "heuristic"])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loss"] == pytest.approx(m["subnets"]["heuristic"]["loss"], abs=1e-5)
    ids = torch.randint(0, 1000, (1, 10), generator=torch.Generator().manual_seed(2))
    exported = run([sys.executable, "-m", "flexrank", "export", str(runs["qat"]), "--out", str(tmp_path / "heuristic")])
    said = json.loads(exported.stdout.strip().splitlines()[-1])  # where the model is, not where it was written first
    assert said == {"int4_model": str(tmp_path / "heuristic"),
                    "int4_model_bytes": (tmp_path / "heuristic" / "model.safetensors").stat().st_size}
    run([sys.executable, "-m", "flexrank", "export", str(runs["qat"]), "--out", str(tmp_path / "minimal"),
         "--subnet", "minimal"])
    trained = logits(runs["qat"] / "int4_model", ids)  # written at the end of training
    heuristic = logits(tmp_path / "heuristic", ids)
    assert torch.equal(heuristic, trained)  # the same subnet absorbed and packed again: the same bytes
    assert not torch.equal(logits(tmp_path / "minimal", ids), trained)


def test_merging_into_an_int4_run_is_refused_with_a_clear_error(runs, tmp_path):
    done = flexrank("export", str(runs["qat"]), "--out", str(tmp_path / "a"), "--merge-sparse", str(tmp_path / "b"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--merge-sparse" in done.stderr and "absorbed into the INT4 weights" in done.stderr
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("change, key", [
    ({"adapter": {"method": "elastic", "r": 8, "elastic": NLS}}, "adapter.method"),
    ({"distributed": {"backend": "zero3", "nproc": 2}}, "distributed.backend"),
    ({"model": {"quantization": {"method": "nncf_int4_ptq", "mode": "nf4"}}}, "mode"),
])
def test_bad_post_training_options_are_refused(change, key):
    raw = {"model": {"quantization": {"method": "nncf_int4_ptq"}}, **change}
    with pytest.raises((ConfigError, ValueError), match=key):
        load_config(raw=raw)


def test_a_received_run_with_an_old_pickled_int4_model_is_refused_not_executed(runs, tmp_path):
    received = tmp_path / "received"
    shutil.copytree(runs["ptq"], received)
    for name in ("int4_config.json", "model.safetensors"):  # a run written before the safetensors format
        (received / "int4_model" / name).unlink()
    marker = tmp_path / "pwned"
    plant_pickle_payload(received / "int4_model", marker)
    for command in (["eval", str(received)], ["export", str(received), "--out", str(tmp_path / "out")]):
        done = flexrank(*command)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        errors = [line for line in done.stderr.splitlines() if line.startswith("flexrank: error:")]
        assert len(errors) == 1 and "model.pt" in errors[0] and "never loaded" in errors[0], done.stderr
        assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_export_of_a_post_training_run_writes_the_same_int4_model(runs, tmp_path):
    exported = run([sys.executable, "-m", "flexrank", "export", str(runs["ptq"]), "--out", str(tmp_path / "int4")])
    said = json.loads(exported.stdout.strip().splitlines()[-1])
    assert said == {"int4_model": str(tmp_path / "int4"),
                    "int4_model_bytes": (tmp_path / "int4" / "model.safetensors").stat().st_size}
    assert (tmp_path / "int4" / "model.safetensors").read_bytes() == \
        (runs["ptq"] / "int4_model" / "model.safetensors").read_bytes()
