"""Adapter methods (one object each, registry in methods.py), the rank layer, export, sparsity, nncf INT4."""
