"""flexrank: distributed parameter-efficient fine-tuning with run-time rank control."""

__version__ = "0.1.0"
