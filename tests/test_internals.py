"""Guards on the private / undocumented internals of dependencies that flexrank relies on: each lives in one module
per dependency (backends.py: accelerate, DeepSpeed, transformers; rank_layer.py: peft), which lists and checks them;
these tests fail, naming the dependency and its version, when an upgrade changes one, and when a private name of a
dependency is used anywhere else."""

import ast
from functools import cache
from pathlib import Path

import pytest
from peft import LoraConfig

from flexrank.distributed import backends
from flexrank.adapters import rank_layer

PACKAGE = Path(backends.__file__).resolve().parents[1]
ISOLATED = {PACKAGE / "distributed" / "backends.py", PACKAGE / "adapters" / "rank_layer.py"}
DEPENDENCIES = {"transformers", "accelerate", "deepspeed", "peft"}
STDLIB_PRIVATE = {"_exit"}  # os._exit: documented by Python


def test_accelerate_deepspeed_internals_are_as_backends_expects():
    problems = backends.private_api_problems()
    assert not problems, "\n".join(problems)


def test_peft_internals_are_as_rank_layer_expects():
    problems = rank_layer.private_api_problems()
    assert not problems, "\n".join(problems)


def test_a_changed_internal_is_reported_with_the_dependency_version(monkeypatch):
    """What an upgrade that drops an internal looks like (the internal removed for the test)."""
    from importlib.metadata import version

    monkeypatch.delattr(LoraConfig, "_register_custom_module")
    problems = rank_layer.private_api_problems()
    assert len(problems) == 1 and problems[0].startswith(f"peft {version('peft')}: LoraConfig._register_custom_module")


def test_a_missing_torch_foreach_operator_is_reported(monkeypatch):
    import torch
    from importlib.metadata import version

    monkeypatch.delattr(torch, "_foreach_sign")
    problems = backends.private_api_problems()
    assert len(problems) == 1 and problems[0].startswith(f"torch {version('torch')}: torch._foreach_add_, ")


def _sources():
    return sorted(PACKAGE.rglob("*.py"))


@cache
def _own_private_names() -> frozenset[str]:
    """Every _name flexrank itself defines (functions, methods, classes, attributes, module globals) outside the
    isolated modules (which define wrappers named like the internals they replace)."""
    names = set()
    for path in (p for p in _sources() if p not in ISOLATED):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return frozenset(n for n in names if n.startswith("_"))


@pytest.mark.parametrize("path", [p for p in _sources() if p not in ISOLATED], ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_dependency_names_outside_the_isolated_modules(path):
    own = _own_private_names() | STDLIB_PRIVATE
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] in DEPENDENCIES and (any(p.startswith("_") for p in parts)
                                             or any(a.name.startswith("_") for a in node.names)):
                found.append(f"line {node.lineno}: from {node.module} import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in DEPENDENCIES and "._" in a.name]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if node.attr not in own:
                found.append(f"line {node.lineno}: .{node.attr}")
    assert not found, f"{path.relative_to(PACKAGE.parent)} uses private names of a dependency " \
                      f"(move them to backends.py / rank_layer.py with a guard): {found}"
