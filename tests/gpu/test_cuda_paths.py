"""The CUDA paths, on a real GPU (`pytest -m gpu`; tests/gpu/run.sh runs them in one go). Skipped without CUDA
(tests/conftest.py). Their CPU twins: test_kernels.py (kernel choice and fallback), test_methods.py / test_export.py
(QLoRA NF4 with fp32 compute on CPU), test_distributed.py (DDP with gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_helpers import free_port, metrics, recipe, run

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]


def _config(model_dir, **model):
    from flexrank.config import load_config

    return load_config(raw={"model": {"name_or_path": str(model_dir), "dtype": "bfloat16", **model}})


def test_auto_attention_is_flash_attention_and_matches_sdpa(tiny_llama_dir):
    from flexrank.models import kernels
    from flexrank.models.loading import load_base_model, load_tokenizer

    pytest.importorskip("flash_attn", reason="flash-attn is not installed here (optional: pip install 'flexrank[gpu]')")
    assert kernels.choose_attention("auto", "bfloat16") == ("flash_attention_2", "auto: flash-attn on CUDA")
    cfg = _config(tiny_llama_dir)
    tokenizer = load_tokenizer(cfg.model)
    lines = []
    flash = load_base_model(cfg.model, tokenizer, log=lines.append).cuda().eval()
    assert flash.config._attn_implementation == "flash_attention_2"
    assert lines == ["[flexrank] attention kernel: flash_attention_2 (auto: flash-attn on CUDA)"]
    sdpa = load_base_model(_config(tiny_llama_dir, attn_implementation="sdpa").model, tokenizer,
                           log=lambda _: None).cuda().eval()
    ids = torch.randint(0, 2000, (2, 32), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        a, b = flash(input_ids=ids).logits.float(), sdpa(input_ids=ids).logits.float()
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=5e-2)  # bf16 kernels: same function, different summation


def test_liger_kernel_is_chosen_and_trains(tiny_llama_dir, tmp_path):
    from flexrank.models import kernels

    assert kernels.choose_liger("auto") == (True, "auto: on (CUDA)")
    out = tmp_path / "run"
    proc = run([sys.executable, "-m", "flexrank", "train", str(recipe(tmp_path, tiny_llama_dir)),
                "--set", f"training.output_dir={out}", "--set", "model.liger_kernel=true",
                "--set", "training.bf16=true"])
    assert "[flexrank] liger kernel: on (requested)" in proc.stdout
    losses = metrics(out)["train"]["losses"]
    assert len(losses) == 6 and all(map(lambda x: x == x, losses)) and losses[-1] < losses[0]


def test_qlora_nf4_on_cuda_trains_and_exports(tiny_llama_dir, tmp_path):
    """bitsandbytes 4-bit on CUDA with bf16 compute (the CPU twin uses fp32 compute)."""
    out = tmp_path / "run"
    proc = run([sys.executable, "-m", "flexrank", "train", str(recipe(tmp_path, tiny_llama_dir, "sora")),
                "--set", f"training.output_dir={out}",
                "--set", "model.quantization.bnb_4bit_compute_dtype=bfloat16", "--set", "training.bf16=true"])
    m = metrics(out)
    assert len(m["train"]["losses"]) == 6 and all(map(lambda x: 0 < x < 100, m["train"]["losses"]))
    assert 0 < m["export"]["total_rank"] <= 4 * 14
    # The adapter loads in stock peft on a 4-bit CUDA base.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=q, device_map={"": "cuda:0"})
    assert type(base.model.layers[0].self_attn.q_proj.weight).__name__ == "Params4bit"
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]], device="cuda")).logits).all()
    assert "[flexrank] wrote" in proc.stdout


def test_one_process_ddp_with_nccl(tiny_llama_dir, tmp_path):
    """`accelerate launch` with the shipped DDP config and one process: a real NCCL process group on the GPU."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / "ddp.yaml"), "--num_processes", "1", "--main_process_port",
           str(free_port()), "-m", "flexrank", "train", str(recipe(tmp_path, tiny_llama_dir)),
           "--set", f"training.output_dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NCCL_DEBUG": "INFO", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NCCL INFO" in proc.stdout + proc.stderr  # NCCL, not gloo, carried the collectives
    m = metrics(out)
    assert m["train"]["world_size"] == 1 and len(m["train"]["losses"]) == 6
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
