"""flexrank: distributed parameter-efficient fine-tuning with run-time rank control."""

__version__ = "0.1.0"

from . import log_filters as _log_filters
from .models import hub_kernels as _hub_kernels

_log_filters.install()  # before torch / transformers are imported: their import-time warnings are the noisy ones
_hub_kernels.install()  # before transformers / peft / bitsandbytes: no kernel fetched from the Hub unless asked
