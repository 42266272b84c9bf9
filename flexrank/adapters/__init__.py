"""Adapter methods (one object each, interface in method.py, registry in registry.py), the rank layer, export, sparsity, nncf INT4."""
