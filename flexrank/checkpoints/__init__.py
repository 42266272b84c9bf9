"""Checkpoint completion manifest and rotation, world-size-independent state, preemption."""
