"""Run-time choice of GPU-only kernels, with a fallback that works everywhere. The run log says what runs."""

import importlib.util

import torch

from ..errors import ConfigError

ATTENTION_CHOICES = ("auto", "flash_attention_2", "sdpa", "eager")
FLASH_DTYPES = ("bfloat16", "float16")  # flash-attn's kernels take half precision only


def attention_dtype_problem(requested: str, dtype: str) -> ConfigError | None:
    """An explicit flash_attention_2 for a model in another dtype: refused up front (the recipe check), whatever
    the machine."""
    if requested == "flash_attention_2" and dtype not in FLASH_DTYPES:
        return ConfigError("model.attn_implementation", requested, f"sdpa, eager or auto with model.dtype {dtype}",
                           "flash-attn takes float16 / bfloat16 only: set model.dtype: bfloat16 to use it")
    return None


def _flash_attn_missing() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed (pip install 'flexrank[gpu]')"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return f"GPU compute capability {major}.x < 8.0"
    return None


def choose_attention(requested: str, dtype: str) -> tuple[str, str]:
    """(attn_implementation, why) for a model in `dtype`. `auto` prefers flash_attention_2 where it can run (CUDA,
    flash-attn installed, a half-precision model) and falls back to SDPA, saying why."""
    if requested not in ATTENTION_CHOICES:
        raise ConfigError("model.attn_implementation", requested, ", ".join(ATTENTION_CHOICES))
    if (problem := attention_dtype_problem(requested, dtype)) is not None:
        raise problem
    missing = _flash_attn_missing()
    if requested == "auto" and not missing and dtype not in FLASH_DTYPES:
        return "sdpa", f"auto: SDPA (model.dtype {dtype}; flash-attn takes float16 / bfloat16 only)"
    if requested == "auto":
        return ("sdpa", f"auto: SDPA ({missing})") if missing else ("flash_attention_2", "auto: flash-attn on CUDA")
    if requested == "flash_attention_2" and missing:
        raise ConfigError("model.attn_implementation", requested, "sdpa, eager or auto", f"unavailable here: {missing}")
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
