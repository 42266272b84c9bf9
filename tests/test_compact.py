"""Compact export (`flexrank export RUN --compact OUT`): a physically smaller HF model, sliced to a subnet's base
widths and adapter ranks, that stock transformers (+ peft) loads with the supernet's logits for that subnet.

The supernet's subnet is computed here by a reference masked forward: forward pre-hooks that zero the MLP
intermediate channels >= w on down_proj's input and the query heads >= h on o_proj's input (the LoNAS cut),
on a small random Llama (grouped-query attention: 4 heads, 2 key/value heads) with flexrank's rank layer."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from conftest import tiny_llama_config
from flexrank.elastic.base_shape import LayerWidths
from flexrank.elastic.compact import export_compact
from flexrank.errors import ConfigError
from flexrank.adapters.rank_layer import rank_layers, register_rank_layer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(3))


@pytest.fixture()
def supernet():
    """A tiny Llama with a trained-looking rank-layer adapter (random B) and a subnet of ranks active."""
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(tiny_llama_config()).eval(),
                           register_rank_layer(LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)))
    with torch.no_grad():
        for name, layer in rank_layers(model).items():
            layer.lora_B["default"].weight.normal_(std=0.1)
            layer.set_width(4 if "layers.0" in name else 6)
    return model.eval()


def _masked_logits(model, widths: dict[int, LayerWidths]) -> torch.Tensor:
    """The LoNAS cut of the supernet: zero the intermediate channels >= w (down_proj input) and the heads >= h
    (o_proj input); every weight untouched."""
    def zero_from(n):
        def hook(module, args):
            x = args[0].clone()
            x[..., n:] = 0
            return (x,)
        return hook

    layers = model.get_base_model().model.layers
    handles = []
    for i, w in widths.items():
        if w.mlp is not None:
            handles.append(layers[i].mlp.down_proj.register_forward_pre_hook(zero_from(w.mlp)))
        if w.attention is not None:
            handles.append(layers[i].self_attn.o_proj.register_forward_pre_hook(zero_from(w.attention)))
    try:
        with torch.no_grad():
            return model(input_ids=IDS).logits
    finally:
        for h in handles:
            h.remove()


def _size(folder) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors"))


# Layer 0: MLP 96 of 128, 2 of 4 heads; layer 1: MLP 64 (padded to 96 with zero down_proj columns), 1 head
# (padded to the model's 2 with zero o_proj columns). 2 query heads under g = 2 keep 1 key/value head.
WIDTHS = {0: LayerWidths(mlp=96, attention=32), 1: LayerWidths(mlp=64, attention=16)}


def test_merged_compact_model_loads_with_stock_transformers_and_gives_the_subnet_logits(supernet, tmp_path):
    expected = _masked_logits(supernet, WIDTHS)
    summary = export_compact(supernet, WIDTHS, tmp_path / "compact")
    config = json.loads((tmp_path / "compact" / "config.json").read_text())
    assert (config["intermediate_size"], config["num_attention_heads"], config["num_key_value_heads"],
            config["head_dim"]) == (96, 2, 1, 16)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "compact").eval()
    assert model.model.layers[1].mlp.down_proj.weight.shape == (64, 96)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (16, 64)
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    assert (logits - expected).abs().max() <= 1e-4
    # Per layer q 64x32, k/v 64x16, o 32x64, gate/up 64x96, down 96x64; embeddings and head 1000x64; 3 norms.
    assert summary["params"] == 2 * (2048 + 1024 + 1024 + 2048 + 3 * 6144) + 2 * 64000 + 5 * 64
    full = LlamaForCausalLM(tiny_llama_config())
    full.save_pretrained(tmp_path / "full")
    assert _size(tmp_path / "compact") < 0.9 * _size(tmp_path / "full")


def test_compact_model_with_a_plain_peft_adapter_gives_the_subnet_logits(supernet, tmp_path):
    expected = _masked_logits(supernet, WIDTHS)
    summary = export_compact(supernet, WIDTHS, tmp_path / "compact", merge=False)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "compact")
    model = PeftModel.from_pretrained(base, tmp_path / "compact" / "adapter").eval()
    assert model.peft_config["default"].rank_pattern["model.layers.1.mlp.up_proj"] == 6
    assert model.get_base_model().model.layers[0].mlp.up_proj.lora_B["default"].weight.shape == (96, 4)
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    assert (logits - expected).abs().max() <= 1e-4
    # Adapter: 7 modules x rank x (in + out) at the compact sizes; layer 0 rank 4, layer 1 rank 6.
    per_rank = (64 + 32) + 2 * (64 + 16) + (32 + 64) + 2 * (64 + 96) + (96 + 64)
    assert summary["adapter_params"] == (4 + 6) * per_rank


def test_rank_only_subnet_gives_a_smaller_adapter_on_the_full_base(supernet, tmp_path):
    expected = _masked_logits(supernet, {})
    summary = export_compact(supernet, {}, tmp_path / "compact", merge=False)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "compact"),
                                      tmp_path / "compact" / "adapter").eval()
    with torch.no_grad():
        assert (model(input_ids=IDS).logits - expected).abs().max() <= 1e-4
    per_rank = (64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64)
    assert summary["adapter_params"] == (4 + 6) * per_rank  # of the supernet's 2 x 8 ranks
    assert summary["intermediate_size"] == 128 and summary["num_attention_heads"] == 4


def test_refuses_a_foreign_folder_and_widths_that_do_not_fit(supernet, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="--compact"):
        export_compact(supernet, WIDTHS, tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    with pytest.raises(ConfigError, match="whole heads"):
        export_compact(supernet, {0: LayerWidths(attention=24)}, tmp_path / "out")
    with pytest.raises(ConfigError, match="intermediate_size"):
        export_compact(supernet, {1: LayerWidths(mlp=256)}, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"layers 0\.\.1"):
        export_compact(supernet, {5: LayerWidths(mlp=64)}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_exports_a_trained_runs_subnet_compact(tiny_llama_dir, tmp_path):
    """`flexrank export RUN --subnet minimal --compact OUT --keep-adapter` on a trained elastic run with base widths
    (MLP 128 -> 64 in the minimal subnet), its metrics.json size report, and a foreign --compact folder refused
    before the model loads."""
    import subprocess
    import sys

    from dist_helpers import recipe
    from flexrank.config import load_config
    from flexrank.adapters.registry import load_run
    from flexrank.run import train

    run = tmp_path / "run"
    metrics = train(load_config(recipe(tmp_path, tiny_llama_dir, "elastic", max_steps=2),
                                [f"training.output_dir={run}", "adapter.elastic.base_widths={mlp: [128, 96, 64]}"]))
    size = metrics["size"]
    # gate/up outputs and down inputs cut from 128 to 64 in both layers (hidden 64)
    assert size["maximal"]["base_params"] - size["minimal"]["base_params"] == 2 * 3 * 64 * (128 - 64)
    # per layer, rank x (in + out): q (64+64), k and v (64+32 each, 2 key/value heads of 16); up (64+w), down (w+64)
    assert size["maximal"]["adapter_params"] == 2 * 8 * (128 + 96 + 96 + 2 * (64 + 128))
    assert size["minimal"]["adapter_params"] == 2 * 4 * (128 + 96 + 96 + 2 * (64 + 64))
    out = tmp_path / "compact"
    proc = subprocess.run([sys.executable, "-m", "flexrank", "export", str(run), "--subnet", "minimal",
                           "--compact", str(out), "--keep-adapter"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    finished = load_run(run)
    supernet, controller = finished.model, finished.controller
    controller.activate("minimal")
    ids = torch.randint(0, 2000, (2, 10), generator=torch.Generator().manual_seed(4))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "adapter").eval()
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - supernet.eval()(input_ids=ids).logits).abs().max()
    assert diff <= 1e-4
    assert set(model.peft_config["default"].rank_pattern.values()) == {4}
    assert model.config.intermediate_size == 64
    assert (out / "tokenizer_config.json").exists()

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    proc = subprocess.run([sys.executable, "-m", "flexrank", "export", str(run), "--compact", str(tmp_path / "mine")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "flexrank: error: --compact:" in proc.stderr and "attention kernel" not in proc.stdout


def test_refuses_a_plain_lora_model(tmp_path):
    """A plain peft LoRA (no rank layer, no subnet): nothing to slice ranks from; refused, nothing written."""
    model = get_peft_model(LlamaForCausalLM(tiny_llama_config()), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="rank layer"):
        export_compact(model, {}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
