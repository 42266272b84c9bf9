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


@pytest.fixture()
def varlen_backends():
    from flexrank.models import varlen

    varlen.register()
    varlen._backends.clear()
    varlen.announce(None)
    yield varlen
    varlen._backends.clear()


@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen", "sdpa"])
def test_varlen_backends_match_the_padded_batch_in_bf16(backend, varlen_backends, monkeypatch):
    """Packed rows through each backend of flexrank's varlen attention (flash-attn, torch's varlen_attn, SDPA per
    document without cuDNN) give the padded batch's loss, logits and gradients in bf16 (CPU twin:
    test_varlen.py, SDPA per document in fp32)."""
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    from flexrank.data.records import PackingCollator, PaddingCollator
    from flexrank.models import kernels

    if backend == "flash_attn":
        pytest.importorskip("flash_attn", reason="flash-attn is not installed here (optional: pip install 'flexrank[gpu]')")
    else:
        monkeypatch.setattr(kernels, "_flash_attn_missing", lambda: "left out by this test")
    if backend == "torch_varlen" and (missing := kernels._torch_varlen_missing()):
        pytest.skip(f"torch varlen: {missing}")
    if backend == "sdpa":
        monkeypatch.setattr(kernels, "_torch_varlen_missing", lambda: "left out by this test")
    assert varlen_backends.backend_for(torch.device("cuda"), torch.bfloat16) == backend

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).to("cuda", torch.bfloat16).train()  # GQA: 4 heads, 2 KV heads
    g = torch.Generator().manual_seed(1)
    features = [{"input_ids": (ids := torch.randint(0, 1000, (n,), generator=g).tolist()), "labels": ids}
                for n in (5, 130, 17, 64, 2, 90)]
    runs = {}
    for name, batch, attention in (("padded", PaddingCollator(0)(features), "sdpa"),
                                   ("packed", PackingCollator()(features), varlen_backends.ATTENTION_NAME)):
        model.config._attn_implementation = attention
        model.zero_grad()
        out = model(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()})
        out.loss.backward()
        runs[name] = out, {n: p.grad.float().clone() for n, p in model.named_parameters() if "self_attn" in n}
    (ref, ref_grads), (out, grads) = runs["padded"], runs["packed"]
    assert torch.isfinite(out.loss) and out.loss.item() == pytest.approx(ref.loss.item(), abs=2e-2)
    offset = 0
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        torch.testing.assert_close(out.logits[0, offset:offset + n].float(), ref.logits[row, :n].float(),
                                   atol=5e-2, rtol=0)  # bf16 kernels: same function, different summation
        offset += n
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=2e-2, rtol=5e-2, msg=name)


def test_auto_with_packing_in_bf16_runs_a_varlen_kernel(tiny_llama_dir):
    """The choice a packed bf16 run gets on this GPU: flash-attn (transformers' varlen path) or flexrank's varlen
    attention with torch's kernel; never SDPA with a dense mask."""
    from flexrank.models import kernels
    from flexrank.models.loading import load_base_model, load_tokenizer

    cfg = _config(tiny_llama_dir)
    lines = []
    model = load_base_model(cfg.model, load_tokenizer(cfg.model), log=lines.append, packing=True)
    attn = model.config._attn_implementation
    if kernels._flash_attn_missing() is None:
        assert attn == "flash_attention_2" and "packed rows via its varlen kernel" in lines[0]
    elif kernels._torch_varlen_missing() is None:
        assert attn == "flexrank_varlen" and "packed rows via torch varlen" in lines[0]
    else:
        pytest.skip(f"neither flash-attn nor torch varlen here: {lines[0]}")
    assert model.use_kernels is False and lines[-1].startswith("[flexrank] hub kernels: off")
