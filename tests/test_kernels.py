"""GPU-only kernels are chosen at run time, with a fallback that works here; asking for a missing one is an error.

These are the CPU twins of tests/gpu/test_cuda_paths.py: CUDA is switched off for them (monkeypatch), so they
hold on a GPU machine too; the GPU file checks the choices where CUDA is really there."""

import pytest

from flexrank.models import kernels
from flexrank.errors import ConfigError


@pytest.fixture(autouse=True)
def no_cuda(monkeypatch):
    monkeypatch.setattr(kernels.torch.cuda, "is_available", lambda: False)


def test_auto_falls_back_to_sdpa_and_says_why():
    impl, why = kernels.choose_attention("auto", "bfloat16")
    assert impl == "sdpa" and "no CUDA device" in why


def test_auto_picks_flash_attention_when_available_for_a_half_precision_model(monkeypatch):
    monkeypatch.setattr(kernels, "_flash_attn_missing", lambda: None)
    assert kernels.choose_attention("auto", "bfloat16")[0] == "flash_attention_2"
    assert kernels.choose_attention("auto", "float16")[0] == "flash_attention_2"
    # flash-attn takes half precision only: an fp32 model (the default recipe) gets SDPA, with the reason
    assert kernels.choose_attention("auto", "float32") == (
        "sdpa", "auto: SDPA (model.dtype float32; flash-attn takes float16 / bfloat16 only)")


def test_explicit_flash_attention_with_fp32_is_refused_up_front(monkeypatch):
    from flexrank.config import load_config

    monkeypatch.setattr(kernels, "_flash_attn_missing", lambda: None)  # whatever the machine
    with pytest.raises(ConfigError, match=r"^model.attn_implementation: got 'flash_attention_2'; allowed: varlen, "
                                          r"sdpa, eager or auto with model.dtype float32 \(flash-attn takes float16"):
        load_config(raw={"model": {"attn_implementation": "flash_attention_2"}})
    assert load_config(raw={"model": {"attn_implementation": "flash_attention_2", "dtype": "bfloat16"}})
    with pytest.raises(ConfigError, match="model.dtype float32"):
        kernels.choose_attention("flash_attention_2", "float32")


PACKED_CPU = ("flexrank_varlen", "auto with data.packing: packed rows via SDPA per document, no dense mask; "
                                   "flash-attn / torch varlen need CUDA")


def _cuda(monkeypatch, flash: bool, torch_varlen: bool = True):
    monkeypatch.setattr(kernels.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "_flash_attn_missing", lambda: None if flash else "flash-attn is not installed")
    monkeypatch.setattr(kernels, "_torch_varlen_missing", lambda: None if torch_varlen else "torch 2.8 has none")


def test_packed_rows_get_varlen_attention_chosen_by_device_and_dtype(monkeypatch):
    """With data.packing, auto never hands packed rows a dense block-diagonal mask: flash-attn's varlen kernel
    (transformers' flash_attention_2) where it runs, else flexrank's varlen attention with the best backend."""
    assert kernels.choose_attention("auto", "bfloat16", packing=True) == PACKED_CPU
    assert kernels.choose_attention("auto", "float32", packing=True) == PACKED_CPU
    assert kernels.choose_attention("auto", "float32") == ("sdpa", "auto: SDPA (no CUDA device)")  # not packed
    _cuda(monkeypatch, flash=True)
    assert kernels.choose_attention("auto", "bfloat16", packing=True) == (
        "flash_attention_2", "auto: flash-attn on CUDA, packed rows via its varlen kernel")
    # an fp32 model never gets flash-attn: its packed rows run SDPA per document, with the reason
    assert kernels.choose_attention("auto", "float32", packing=True) == (
        "flexrank_varlen", "auto with data.packing: packed rows via SDPA per document, no dense mask; float32 "
                           "inputs: flash-attn / torch varlen take float16 / bfloat16 only")
    assert kernels.varlen_backend("cuda", kernels.torch.bfloat16) == ("flash_attn", "bfloat16 on CUDA")
    _cuda(monkeypatch, flash=False)
    assert kernels.choose_attention("auto", "bfloat16", packing=True) == (
        "flexrank_varlen", "auto with data.packing: packed rows via torch varlen, no dense mask; bfloat16 on CUDA; "
                           "flash-attn is not installed")
    assert kernels.varlen_backend("cuda", "float16", softcap=True)[0] == "sdpa"  # softcap: flash-attn only
    assert kernels.varlen_backend("cuda", "float16", dropout=True)[0] == "sdpa"  # torch varlen has no dropout
    _cuda(monkeypatch, flash=False, torch_varlen=False)
    assert kernels.choose_attention("varlen", "bfloat16") == (
        "flexrank_varlen", "requested: packed rows via SDPA per document, no dense mask; flash-attn is not "
                           "installed; torch varlen: torch 2.8 has none")


def test_explicit_kernels_with_packing_say_what_they_cost():
    assert kernels.choose_attention("sdpa", "float32", packing=True) == (
        "sdpa", "requested; packed rows pay a dense block-diagonal mask (auto or varlen avoid it)")
    assert kernels.choose_attention("varlen", "float32", packing=True)[0] == "flexrank_varlen"


def test_varlen_without_packing_is_refused_up_front():
    from flexrank.config import load_config

    with pytest.raises(ConfigError, match=r"^model.attn_implementation: got 'varlen'.*set data.packing: true"):
        load_config(raw={"model": {"attn_implementation": "varlen"}})
    assert load_config(raw={"model": {"attn_implementation": "varlen"}, "data": {"packing": True}})


def test_explicit_unavailable_kernel_is_a_clear_error():
    with pytest.raises(ConfigError) as exc:
        kernels.choose_attention("flash_attention_2", "bfloat16")
    msg = str(exc.value)
    assert "model.attn_implementation" in msg and "flash_attention_2" in msg and "sdpa" in msg and "CUDA" in msg


def test_explicit_cpu_kernels_are_kept():
    assert kernels.choose_attention("eager", "float32") == ("eager", "requested")
    assert kernels.choose_attention("sdpa", "float32")[0] == "sdpa"


def test_liger_only_with_cuda():
    assert kernels.choose_liger("auto")[0] is False
    assert kernels.choose_liger(False) == (False, "off")
    with pytest.raises(ConfigError, match="model.liger_kernel"):
        kernels.choose_liger(True)


def test_model_loads_with_the_chosen_kernel(tiny_llama_dir):
    from flexrank.config import load_config
    from flexrank.models.loading import load_base_model, load_tokenizer

    cfg = load_config(raw={"model": {"name_or_path": str(tiny_llama_dir)}})
    lines = []
    model = load_base_model(cfg.model, load_tokenizer(cfg.model), log=lines.append)
    assert model.config._attn_implementation == "sdpa"
    assert lines[0] == "[flexrank] attention kernel: sdpa (auto: SDPA (no CUDA device))"
    lines = []
    model = load_base_model(cfg.model, load_tokenizer(cfg.model), log=lines.append, packing=True)
    assert model.config._attn_implementation == "flexrank_varlen"
    assert lines[0] == "[flexrank] attention kernel: flexrank_varlen ({})".format(PACKED_CPU[1])


def test_model_loading_fetches_no_hub_kernel(tiny_llama_dir, monkeypatch):
    """transformers 5.x kernelises a loaded model with Hub kernels by default; flexrank loads with use_kernels off
    (USE_HUB_KERNELS unset), works offline, and says so."""
    import kernels as kernels_package
    from huggingface_hub import constants
    from transformers import PreTrainedModel

    from flexrank.config import load_config
    from flexrank.models import hub_kernels
    from flexrank.models.loading import load_base_model, load_tokenizer

    def no_hub(*args, **kwargs):
        raise AssertionError("a Hub kernel was fetched or a model kernelised")

    asked = []
    set_use_kernels = PreTrainedModel.set_use_kernels

    def spy(self, use_kernels, *args, **kwargs):
        asked.append(use_kernels)
        return set_use_kernels(self, use_kernels, *args, **kwargs)

    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(PreTrainedModel, "set_use_kernels", spy)
    monkeypatch.setattr(kernels_package, "kernelize", no_hub)
    monkeypatch.setattr(kernels_package.get_kernel, "__wrapped__", no_hub)  # the real fetch, behind flexrank's guard
    monkeypatch.setattr("transformers.integrations.hub_kernels._kernels_kernelize", no_hub)
    cfg = load_config(raw={"model": {"name_or_path": str(tiny_llama_dir)}})
    lines = []
    model = load_base_model(cfg.model, load_tokenizer(cfg.model), log=lines.append)
    assert asked == [False] and model.use_kernels is False
    assert lines[-1].startswith("[flexrank] hub kernels: off (set USE_HUB_KERNELS=YES to let transformers / "
                                "bitsandbytes fetch kernels from the Hub)")
    assert not hub_kernels.allowed()


def test_hub_kernels_are_refused_unless_asked(monkeypatch):
    """flexrank guards `kernels.get_kernel` from its own import on (bitsandbytes calls it when imported on an
    AVX512-BF16 CPU, peft imports bitsandbytes): refused and recorded unless USE_HUB_KERNELS=YES."""
    import kernels as kernels_package

    from flexrank.models import hub_kernels

    assert getattr(kernels_package.get_kernel, "_flexrank_guard", False)  # installed by `import flexrank`
    fetched = []
    guarded = hub_kernels._guarded(lambda repo, **kw: fetched.append(repo) or "kernel")
    monkeypatch.setattr(hub_kernels, "refused", [])
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    with pytest.raises(hub_kernels.HubKernelsOff, match="kernels-community/quantization-bitsandbytes not fetched"):
        guarded("kernels-community/quantization-bitsandbytes", version=1)
    assert fetched == [] and hub_kernels.refused == ["kernels-community/quantization-bitsandbytes"]
    assert hub_kernels.decision().endswith("; not fetched: kernels-community/quantization-bitsandbytes")
    monkeypatch.setenv("USE_HUB_KERNELS", "yes")  # the user's word
    assert guarded("kernels-community/activation", version=1) == "kernel" and fetched == ["kernels-community/activation"]
    assert hub_kernels.decision().startswith("on (USE_HUB_KERNELS=yes)")


def test_importing_flexrank_first_keeps_bitsandbytes_from_fetching_its_hub_kernel():
    """The real import order of a run, in a fresh offline process: flexrank, then peft (which imports bitsandbytes;
    on an AVX512-BF16 CPU bitsandbytes asks the Hub for a CPU kernel). Nothing is fetched, nothing is printed."""
    import os
    import subprocess
    import sys

    code = ("import flexrank, peft, kernels; from flexrank.models import hub_kernels; "
            "print(kernels.get_kernel._flexrank_guard, sorted(set(hub_kernels.refused)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}.items()
                               if k != "USE_HUB_KERNELS"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    guarded, refused = proc.stdout.split(" ", 1)
    assert guarded == "True"
    assert refused.strip() in ("[]", "['kernels-community/quantization-bitsandbytes']")  # [] without AVX512-BF16
    assert "kernels-community" not in proc.stderr
