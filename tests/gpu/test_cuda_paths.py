"""The CUDA paths, on a real GPU (`pytest -m gpu`; tests/gpu/run.sh runs them in one go, offline). Skipped without
CUDA (tests/conftest.py); a test of an optional package (flash-attn, liger-kernel, DeepSpeed) skips with the reason
where it does not import. Their CPU twins: test_kernels.py (kernel choice and fallback), test_methods.py /
test_export.py (QLoRA NF4 with fp32 compute on CPU), test_distributed.py (DDP, ZeRO-3, FSDP2 with gloo, and the
controllers' masks on every backend).

Tolerances, and why:
- bf16 against fp32, liger against no liger (both bf16): per-step losses within 2% (rtol 2e-2). bf16 keeps 8
  significant bits (a rounding of 0.4% at most per operation); on the tiny test model the per-step losses of a bf16
  run differ from fp32 by ~0.1-0.3% (reference/gpu.md: liger + bf16 on an H200 against fp32 on CPU, 11.960 vs
  11.970 at the first step), so 2% is several times that and still far below what one step changes (~5%).
- CUDA against CPU, both fp32 (no TF32: torch's default): losses within 1e-3 absolute (~1e-4 relative at a loss
  of ~12), adapters within 1e-4. The kernels differ (summation order, SDPA's memory-efficient kernel on CUDA),
  and Adam turns such noise in near-zero gradients into update differences of up to ~2e-5 after a few steps at
  lr 1e-2 (seen between backends on CPU, dist_helpers.assert_same_adapter). The masks are compared exactly:
  elastic's sampled subnets, SoRA's zeroed gates and AdaLoRA's rank pattern and budget.
- 1-GPU ZeRO-3 / FSDP2 against the same GPU without a launcher: losses within 1e-4, adapters within 1e-4.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from dist_helpers import assert_same_adapter, free_port, metrics, recipe, zero3_test_config

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
BF16 = ("--set", "model.dtype=bfloat16", "--set", "training.bf16=true")


def _config(model_dir, **model):
    from flexrank.config import load_config

    return load_config(raw={"model": {"name_or_path": str(model_dir), "dtype": "bfloat16", **model}})


def _require(module: str, package: str) -> None:
    """Skip, with the reason, where an optional package does not import (missing, or a build that fails to load)."""
    try:
        importlib.import_module(module)
    except Exception as exc:
        pytest.skip(f"{package} does not import here ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                    f"optional: pip install 'flexrank[gpu]' where a wheel exists")


def _train(tmp: Path, recipe_path: Path, name: str, *extra: str, cpu: bool = False) -> tuple[Path, str]:
    """`flexrank train` in a process of its own; cpu: with no GPU visible (the CPU twin). Output dir, stdout."""
    out = tmp / name
    env = {**os.environ, "OMP_NUM_THREADS": "4"}
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-m", "flexrank", "train", str(recipe_path),
                           "--set", f"training.output_dir={out}", *extra],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return out, proc.stdout


def _losses(out: Path) -> list[float]:
    losses = metrics(out)["train"]["losses"]
    assert len(losses) == 6 and all(0 < x < 100 for x in losses), losses
    return losses


def test_auto_attention_is_flash_attention_and_matches_sdpa(tiny_llama_dir):
    from flexrank.models import kernels
    from flexrank.models.loading import load_base_model, load_tokenizer

    _require("flash_attn", "flash-attn")
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip(f"flash-attn needs compute capability >= 8.0 (this GPU: {torch.cuda.get_device_capability()})")
    attn, _ = kernels.choose_attention("auto", "bfloat16")
    assert attn == "flash_attention_2"
    cfg = _config(tiny_llama_dir)
    tokenizer = load_tokenizer(cfg.model)
    lines = []
    flash = load_base_model(cfg.model, tokenizer, log=lines.append).cuda().eval()
    assert flash.config._attn_implementation == "flash_attention_2"
    assert lines and lines[0].startswith("[flexrank] attention kernel: flash_attention_2")
    sdpa = load_base_model(_config(tiny_llama_dir, attn_implementation="sdpa").model, tokenizer,
                           log=lambda _: None).cuda().eval()
    ids = torch.randint(0, 2000, (2, 32), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        a, b = flash(input_ids=ids).logits.float(), sdpa(input_ids=ids).logits.float()
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=5e-2)  # bf16 kernels: same function, different summation


def test_liger_kernel_trains_like_the_same_run_without_it(tiny_llama_dir, tmp_path):
    """Like with like: the same recipe, seed and batches (bf16 both), with and without liger."""
    from flexrank.models import kernels

    _require("liger_kernel", "liger-kernel")
    assert kernels.choose_liger("auto") == (True, "auto: on (CUDA)")
    path = recipe(tmp_path, tiny_llama_dir)
    plain, _ = _train(tmp_path, path, "plain", *BF16)
    liger, stdout = _train(tmp_path, path, "liger", *BF16, "--set", "model.liger_kernel=true")
    assert "[flexrank] liger kernel: on (requested)" in stdout
    assert _losses(liger) == pytest.approx(_losses(plain), rel=2e-2)


def test_bf16_trains_like_fp32_on_the_same_batches(tiny_llama_dir, tmp_path):
    """model.dtype bfloat16 + training.bf16 (the GPU setting bench/gpu.py recommends) against fp32: same recipe,
    seed and batches, per-step losses within 2%."""
    path = recipe(tmp_path, tiny_llama_dir)
    fp32, _ = _train(tmp_path, path, "fp32")
    bf16, _ = _train(tmp_path, path, "bf16", *BF16)
    assert _losses(bf16) == pytest.approx(_losses(fp32), rel=2e-2)
    assert _losses(bf16) != _losses(fp32)  # bf16 did run: its roundings show in the losses
    assert yaml.safe_load((bf16 / "config.yaml").read_text())["model"]["dtype"] == "bfloat16"


@pytest.mark.parametrize("method", ["elastic", "sora", "adalora"])
def test_controller_on_cuda_matches_its_cpu_twin(tiny_llama_dir, tmp_path, method):
    """The same recipe (fp32) on the GPU and on the CPU (no GPU visible): the same subnets sampled (elastic), the
    same gates zeroed (SoRA), the same rank pattern within the same budget (AdaLoRA), close losses and adapters."""
    path = recipe(tmp_path, tiny_llama_dir, method)
    gpu, _ = _train(tmp_path, path, "gpu")
    cpu, _ = _train(tmp_path, path, "cpu", cpu=True)
    assert _losses(gpu) == pytest.approx(_losses(cpu), abs=1e-3)
    assert_same_adapter(cpu, gpu, atol=1e-4)
    if method == "elastic":
        samples = (gpu / "elastic_samples.jsonl").read_text()
        assert samples == (cpu / "elastic_samples.jsonl").read_text()
        assert len({json.dumps(json.loads(line)["subnet"]) for line in samples.splitlines()}) > 1
    else:  # the pruned ranks: the same ones, and some were
        pattern = metrics(gpu)["export"]["rank_pattern"]
        assert pattern == metrics(cpu)["export"]["rank_pattern"]
        assert sum(pattern.values()) < 4 * 14
    if method == "adalora":  # the budget reached its target exactly: target_r x modules
        assert metrics(gpu)["export"]["total_rank"] == metrics(cpu)["export"]["total_rank"] == 2 * 14


def test_qlora_nf4_on_cuda_trains_and_exports(tiny_llama_dir, tmp_path):
    """bitsandbytes 4-bit on CUDA with bf16 compute (the CPU twin uses fp32 compute)."""
    _require("bitsandbytes", "bitsandbytes")
    out, stdout = _train(tmp_path, recipe(tmp_path, tiny_llama_dir, "sora"), "run",
                         "--set", "model.quantization.bnb_4bit_compute_dtype=bfloat16", "--set", "training.bf16=true")
    m = metrics(out)
    _losses(out)
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
    assert "[flexrank] wrote" in stdout


def _launched(tmp: Path, recipe_path: Path, backend: str) -> tuple[Path, subprocess.CompletedProcess]:
    """`flexrank train` on one GPU through the `accelerate launch` command flexrank builds for `backend`
    (launcher/launch.py, as `--nproc N --backend B` does), NCCL's log on."""
    from flexrank.launcher.launch import launch_command

    out = tmp / backend
    ds = str(zero3_test_config(tmp)) if backend == "zero3" else None
    dist = SimpleNamespace(backend=backend, nproc=1, nnodes=1, node_rank=0, main_process_port=free_port(),
                           main_process_ip=None, deepspeed_config=ds)
    argv = ["train", str(recipe_path), "--set", f"training.output_dir={out}", "--set", f"distributed.backend={backend}"]
    if ds:
        argv += ["--set", f"distributed.deepspeed_config={ds}"]
    cmd, env = launch_command(dist, argv)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, **env, "NCCL_DEBUG": "INFO", "OMP_NUM_THREADS": "4"})
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert "NCCL INFO" in proc.stdout + proc.stderr  # NCCL, not gloo, carried the collectives
    return out, proc


def test_one_process_ddp_with_nccl(tiny_llama_dir, tmp_path):
    """`accelerate launch` with the shipped DDP config and one process: a real NCCL process group on the GPU."""
    out, _ = _launched(tmp_path, recipe(tmp_path, tiny_llama_dir), "ddp")
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


@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_one_gpu_sharded_backend_with_nccl_matches_plain_run(tiny_llama_dir, tmp_path, backend):
    """The GPU twin of test_distributed.py's gloo runs: ZeRO-3 (parameters partitioned: persistence threshold 0)
    and FSDP2 on one GPU through accelerate launch with NCCL, against the same recipe on the same GPU unlaunched."""
    if backend == "zero3":
        _require("deepspeed", "DeepSpeed")
    path = recipe(tmp_path, tiny_llama_dir)
    plain, _ = _train(tmp_path, path, "plain")
    out, _ = _launched(tmp_path, path, backend)
    m = metrics(out)
    assert m["train"]["backend"] == backend and m["train"]["world_size"] == 1
    assert _losses(out) == pytest.approx(_losses(plain), abs=1e-4)
    assert_same_adapter(plain, out, atol=1e-4)
