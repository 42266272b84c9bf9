"""The one place that silences known-harmless, repeated library warnings (installed when flexrank is imported,
before torch/transformers print them). Only WARNING-level (or lower) lines that match a known message are dropped:
errors, and anything not listed here, always get through."""

import logging
import os
import re
import warnings

from .distributed import env

# logger name -> messages from it that say nothing actionable on a CPU/GPU run of flexrank
HARMLESS_LOG_LINES: dict[str, tuple[str, ...]] = {
    # torchao ships CUDA-only kernels; on import it reports each one it could not load
    "torchao": (r"^Failed to load .*\.so\b",),
    "torchao.kernel.intmm": (r"Detected no triton",),  # CPU machines have no triton; nothing to do
    # torchao registers Enum subclasses with torch's pytree on every `from transformers import Trainer`
    "torch.utils._pytree": (r"is an Enum subclass and is now natively supported by torch\.compile",),
    # bitsandbytes' optional CPU kernel from the hub (`kernels` package), refused unless USE_HUB_KERNELS=YES
    # (models/hub_kernels.py; the model-loading log line names it); the built-in CPU path is used instead
    "bitsandbytes.backends.cpu.ops": (r"^Failed to load CPU gemm_4bit_forward from kernels-community",),
}

# (category, message regex) of Python warnings that repeat on every step or process and need no action
HARMLESS_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # torch.distributed deprecations raised from inside DeepSpeed / accelerate (not flexrank's calls)
    (FutureWarning, r"(?s).*torch\.distributed\..*deprecated"),
    (UserWarning, r"(?s).*torch\.distributed\..*deprecated"),
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found"),
)


class HarmlessLineFilter(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.WARNING:
            return True  # never hide an error
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def install() -> None:
    """Idempotent: a logger carries at most one HarmlessLineFilter."""
    for name, patterns in HARMLESS_LOG_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, HarmlessLineFilter) for f in logger.filters):
            logger.addFilter(HarmlessLineFilter(patterns))
    for category, message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    if not env.is_main_process():  # launched processes other than the main one: no weight-loading bars
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
