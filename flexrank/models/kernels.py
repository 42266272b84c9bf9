"""Run-time choice of GPU-only kernels, with a fallback that works everywhere. The run log says what runs."""

import importlib.util

import torch

from ..errors import ConfigError

ATTENTION_CHOICES = ("auto", "flash_attention_2", "varlen", "sdpa", "eager")
FLASH_DTYPES = ("bfloat16", "float16")  # flash-attn's kernels take half precision only
VARLEN = "flexrank_varlen"  # varlen.ATTENTION_NAME (not imported here: that module needs transformers)
VARLEN_LABELS = {"flash_attn": "flash-attn varlen", "torch_varlen": "torch varlen", "sdpa": "SDPA per document"}


def attention_dtype_problem(requested: str, dtype: str) -> ConfigError | None:
    """An explicit flash_attention_2 for a model in another dtype: refused up front (the recipe check), whatever
    the machine. (varlen has no dtype limit: it falls back to SDPA per document where its kernels cannot run.)"""
    if requested == "flash_attention_2" and dtype not in FLASH_DTYPES:
        return ConfigError("model.attn_implementation", requested, f"varlen, sdpa, eager or auto with model.dtype {dtype}",
                           "flash-attn takes float16 / bfloat16 only: set model.dtype: bfloat16 to use it")
    return None


def _below_sm80() -> str | None:
    """Why this GPU cannot run flash kernels (flash-attn's and torch's both need compute capability 8.0+), or None."""
    major, _ = torch.cuda.get_device_capability()
    return f"GPU compute capability {major}.x < 8.0" if major < 8 else None


def _flash_attn_missing() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed (pip install 'flexrank[gpu]')"
    return _below_sm80()


def _torch_varlen_missing() -> str | None:
    """torch.nn.attention.varlen (torch >= 2.9) runs torch's own flash kernels: CUDA, sm80+."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if not torch.backends.cuda.is_flash_attention_available():
        return "this torch build has no flash attention kernels"
    return _below_sm80()


def varlen_backend(device: str, dtype, softcap: bool = False, dropout: bool = False) -> tuple[str, str]:
    """(backend, why) for packed rows on `device` ('cuda', 'cpu', ...) with inputs in `dtype` (a torch dtype or its
    name): flash-attn's varlen kernel, else torch's, else SDPA per document (always available)."""
    name = str(dtype).removeprefix("torch.")
    if device != "cuda":
        return "sdpa", "flash-attn / torch varlen need CUDA"
    if name not in FLASH_DTYPES:
        return "sdpa", f"{name} inputs: flash-attn / torch varlen take float16 / bfloat16 only"
    flash = _flash_attn_missing()
    if flash is None:
        return "flash_attn", f"{name} on CUDA"
    if softcap:
        return "sdpa", f"softcapped attention needs flash-attn: {flash}"
    torch_varlen = _torch_varlen_missing()
    if torch_varlen is None and not dropout:
        return "torch_varlen", f"{name} on CUDA; {flash}"
    why = "attention dropout" if torch_varlen is None else torch_varlen
    return "sdpa", f"{flash}; torch varlen: {why}"


def expected_varlen_backend(dtype: str) -> tuple[str, str]:
    """The varlen backend a model in `dtype` will use on this machine (on its GPU where there is one). Under
    autocast the inputs' dtype differs: varlen.py chooses per call, and logs a choice that differs from this one."""
    return varlen_backend("cuda" if torch.cuda.is_available() else "cpu", dtype)


def choose_attention(requested: str, dtype: str, packing: bool = False) -> tuple[str, str]:
    """(attn_implementation, why) for a model in `dtype`. `auto` prefers flash_attention_2 where it can run (CUDA,
    flash-attn installed, a half-precision model; packed rows then take its varlen kernel) and falls back to SDPA,
    saying why; with packing, the fallback is flexrank's varlen attention (no dense block-diagonal mask)."""
    if requested not in ATTENTION_CHOICES:
        raise ConfigError("model.attn_implementation", requested, ", ".join(ATTENTION_CHOICES))
    if (problem := attention_dtype_problem(requested, dtype)) is not None:
        raise problem
    missing = _flash_attn_missing()
    if requested == "varlen" or (requested == "auto" and packing and (missing or dtype not in FLASH_DTYPES)):
        backend, why = expected_varlen_backend(dtype)
        how = "requested" if requested == "varlen" else "auto with data.packing"
        return VARLEN, f"{how}: packed rows via {VARLEN_LABELS[backend]}, no dense mask; {why}"
    if requested == "auto" and not missing and dtype not in FLASH_DTYPES:
        return "sdpa", f"auto: SDPA (model.dtype {dtype}; flash-attn takes float16 / bfloat16 only)"
    if requested == "auto":
        if missing:
            return "sdpa", f"auto: SDPA ({missing})"
        return "flash_attention_2", "auto: flash-attn on CUDA" + (", packed rows via its varlen kernel" if packing else "")
    if requested == "flash_attention_2" and missing:
        raise ConfigError("model.attn_implementation", requested, "varlen, sdpa, eager or auto",
                          f"unavailable here: {missing}")
    if packing and requested in ("sdpa", "eager"):
        return requested, "requested; packed rows pay a dense block-diagonal mask (auto or varlen avoid it)"
    return requested, "requested"


def choose_liger(requested: str | bool) -> tuple[bool, str]:
    """(use_liger_kernel, why). Liger's Triton kernels import on CPU but fail at the first call."""
    if requested is False:
        return False, "off"
    missing = None if torch.cuda.is_available() else "no CUDA device"
    if missing is None and importlib.util.find_spec("liger_kernel") is None:
        missing = "liger-kernel is not installed (pip install 'flexrank[gpu]')"
    if requested == "auto":
        return (False, f"auto: off ({missing})") if missing else (True, "auto: on (CUDA)")
    if missing:
        raise ConfigError("model.liger_kernel", requested, "false or auto", f"unavailable here: {missing}")
    return True, "requested"
