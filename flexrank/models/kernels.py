"""Run-time choice of GPU-only kernels, with a fallback that works everywhere. The run log says what runs."""

import importlib.util

import torch

from ..errors import ConfigError

ATTENTION_CHOICES = ("auto", "flash_attention_2", "sdpa", "eager")


def _flash_attn_missing() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed (pip install 'flexrank[gpu]')"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return f"GPU compute capability {major}.x < 8.0"
    return None


def choose_attention(requested: str) -> tuple[str, str]:
    """(attn_implementation, why). `auto` prefers flash_attention_2 and falls back to SDPA."""
    if requested not in ATTENTION_CHOICES:
        raise ConfigError("model.attn_implementation", requested, ", ".join(ATTENTION_CHOICES))
    missing = _flash_attn_missing()
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
