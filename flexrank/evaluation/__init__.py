"""Held-out metrics: scoring loops (loss, generation, choice), the metric resolver, sharding over processes."""
