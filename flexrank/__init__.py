"""flexrank: distributed parameter-efficient fine-tuning with run-time rank control."""

__version__ = "0.1.0"

from . import log_filters as _log_filters

_log_filters.install()  # before torch / transformers are imported: their import-time warnings are the noisy ones
