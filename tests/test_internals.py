"""Guards on the private / undocumented internals of dependencies that flexrank relies on. Each lives in one module,
which lists and checks it by behaviour where it can (`private_api_problems()`): distributed/backends.py
(accelerate, DeepSpeed, torch's multi-tensor operators), adapters/rank_layer.py (peft), training/transformers_internals.py
(the Trainer's private methods flexrank overrides or calls, a model's attention kernel, the LR scheduler's state
keys), adapters/nncf_internals.py (nncf's hook storage and names, LoRA quantizers, weight decompressors). These tests fail, naming the
dependency and its version, when an upgrade changes one, and when a private name, a private method override or a
private state key of a dependency appears anywhere else in flexrank or bench/."""

import ast
import importlib
import importlib.util
import inspect
import pkgutil
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig

import flexrank
from flexrank.adapters import nncf_internals, rank_layer
from flexrank.distributed import backends
from flexrank.training import transformers_internals

PACKAGE = Path(flexrank.__file__).resolve().parent
BENCH = PACKAGE.parent / "bench"
GUARDED = {"distributed/backends.py": backends, "adapters/rank_layer.py": rank_layer,
           "training/transformers_internals.py": transformers_internals, "adapters/nncf_internals.py": nncf_internals}
ISOLATED = {PACKAGE / path for path in GUARDED}
DEPENDENCIES = {"transformers", "accelerate", "deepspeed", "peft", "nncf", "torch"}
STDLIB_PRIVATE = {"_exit"}  # os._exit: documented by Python


@pytest.mark.parametrize("path", sorted(GUARDED))
def test_the_internals_are_as_their_module_expects(path):
    problems = GUARDED[path].private_api_problems()
    assert not problems, "\n".join(problems)


def test_a_changed_internal_is_reported_with_the_dependency_version(monkeypatch):
    """What an upgrade that drops an internal looks like (the internal removed for the test)."""
    from importlib.metadata import version

    monkeypatch.delattr(LoraConfig, "_register_custom_module")
    problems = rank_layer.private_api_problems()
    assert len(problems) == 1 and problems[0].startswith(f"peft {version('peft')}: LoraConfig._register_custom_module")


def test_a_missing_torch_foreach_operator_is_reported(monkeypatch):
    from importlib.metadata import version

    monkeypatch.delattr(torch, "_foreach_sign")
    problems = backends.private_api_problems()
    assert len(problems) == 1 and problems[0].startswith(f"torch {version('torch')}: torch._foreach_add_, ")


def test_an_engine_wrapper_that_no_longer_steps_the_engine_is_reported(monkeypatch):
    """accelerate moving DeepSpeed's step out of the wrapper's backward would move where gradients are final."""
    from importlib.metadata import version

    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper

    monkeypatch.setattr(DeepSpeedEngineWrapper, "backward", lambda self, loss, **kwargs: self.engine.backward(loss))
    problems = backends.private_api_problems()
    assert len(problems) == 1 and problems[0].startswith(f"accelerate {version('accelerate')}: DeepSpeedEngineWrapper")


def test_a_trainer_that_loads_the_optimizer_elsewhere_is_reported(monkeypatch):
    """An upgrade that moves the optimizer and scheduler loading out of _prepare_for_training (simulated: loaded
    right after it, from the checkpoint train() was given) would make a replaced loading load them anyway."""
    train, prepare = transformers.Trainer.train, transformers.Trainer._prepare_for_training

    def train_remembering(self, resume_from_checkpoint=None, **kwargs):
        self.checkpoint_given = resume_from_checkpoint
        return train(self, resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def prepare_then_load(self, max_steps, train_dataloader, resume_from_checkpoint):
        out = prepare(self, max_steps, train_dataloader, resume_from_checkpoint)
        if self.checkpoint_given:
            self._load_optimizer_and_scheduler(self.checkpoint_given)
        return out

    monkeypatch.setattr(transformers.Trainer, "train", train_remembering)
    monkeypatch.setattr(transformers.Trainer, "_prepare_for_training", prepare_then_load)
    problems = transformers_internals.private_api_problems()
    assert len(problems) == 1 and problems[0].startswith(f"transformers {transformers.__version__}: the model is "
                                                         "loaded by _load_from_checkpoint and the optimizer")


def test_a_renamed_trainer_method_is_reported(monkeypatch):
    monkeypatch.delattr(transformers.Trainer, "_prepare_for_training")
    problems = transformers_internals.private_api_problems()  # the three checks that train a tiny model cannot run
    assert len(problems) == 3 and all("AttributeError" in p and p.startswith("transformers ") for p in problems)


def test_a_loss_filter_that_no_longer_matches_the_trainers_is_reported(monkeypatch):
    # as if the Trainer's NaN/inf filter had changed its rule: flexrank's device filter then logs other losses
    monkeypatch.setattr(transformers_internals, "filter_non_finite_loss", lambda trainer, loss: loss)
    (problem,) = transformers_internals.private_api_problems()
    assert problem.startswith("transformers ") and "logging_nan_inf_filter" in problem and "[nan, nan]" in problem


def test_an_nncf_decompressor_that_keeps_its_scale_elsewhere_is_reported(monkeypatch):
    from importlib.metadata import version

    from nncf.torch.quantization.layers import INT4AsymmetricWeightsDecompressor

    monkeypatch.setitem(nncf_internals.DECOMPRESSORS, "INT4AsymmetricWeightsDecompressor",
                        ("scale", "compressed_weight_shape", "result_shape", "result_dtype"))  # as if zero_point moved
    assert INT4AsymmetricWeightsDecompressor.__module__ == nncf_internals.DECOMPRESSOR_MODULE
    problems = nncf_internals.private_api_problems()
    assert problems and problems[0].startswith(f"nncf {version('nncf')}: ")


def test_a_scheduler_that_keeps_its_position_elsewhere_is_reported(monkeypatch):
    from importlib.metadata import version

    load = torch.optim.lr_scheduler.LambdaLR.load_state_dict  # what get_scheduler builds

    def load_without_position(self, state):
        load(self, {k: v for k, v in state.items() if k not in ("last_epoch", "_step_count")})

    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "load_state_dict", load_without_position)
    problems = transformers_internals.private_api_problems()
    assert len(problems) == 1 and problems[0].startswith(f"torch {version('torch')}: an LR scheduler")


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py")) + sorted(BENCH.rglob("*.py"))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


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
    return frozenset(n for n in names if _private(n))


def private_uses(source: str, own: frozenset[str]) -> list[str]:
    """A dependency's private names in `source`: imported, read or written as attributes, or used as string keys
    (`state["_step_count"]`, `getattr(obj, "_name")`); names in `own` are flexrank's."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] in DEPENDENCIES and (any(p.startswith("_") for p in parts)
                                             or any(a.name.startswith("_") for a in node.names)):
                found.append(f"line {node.lineno}: from {node.module} import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in DEPENDENCIES and "._" in a.name]
        elif isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) \
                and isinstance(node.slice.value, str) and _private(node.slice.value) and node.slice.value not in own:
            found.append(f"line {node.lineno}: [{node.slice.value!r}]")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) > 1 \
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str) \
                and _private(node.args[1].value) and node.args[1].value not in own:
            found.append(f"line {node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
    return found


def _written_in_flexrank(value) -> bool:
    function = getattr(value, "__func__", getattr(value, "fget", value))  # methods, class/static methods, properties
    return inspect.isfunction(function) and function.__module__.startswith("flexrank")


def private_overrides(classes) -> list[str]:
    """Methods of these classes (or of the flexrank classes they mix in) that replace a private method of a
    dependency class later in their MRO."""
    found = set()
    for cls in classes:
        mro = cls.__mro__
        for i, owner in enumerate(mro):
            if not owner.__module__.startswith("flexrank"):
                continue
            for name in [n for n, v in vars(owner).items() if _private(n) and _written_in_flexrank(v)]:
                replaced = next((base for base in mro[i + 1:] if not base.__module__.startswith("flexrank")
                                 and name in vars(base)), None)
                if replaced is not None:
                    found.add(f"{owner.__module__}.{owner.__qualname__}.{name} overrides "
                              f"{replaced.__module__}.{replaced.__qualname__}.{name}")
    return sorted(found)


@pytest.mark.parametrize("path", [p for p in _sources() if p not in ISOLATED], ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_no_private_dependency_names_outside_the_isolated_modules(path):
    found = private_uses(path.read_text(), _own_private_names() | STDLIB_PRIVATE)
    assert not found, f"{path.relative_to(PACKAGE.parent)} uses private names of a dependency " \
                      f"(move them to {', '.join(sorted(GUARDED))} with a guard): {found}"


def _flexrank_classes() -> list[type]:
    classes = []
    for info in pkgutil.walk_packages(flexrank.__path__, "flexrank."):
        if info.name == "flexrank.__main__":  # runs the command line
            continue
        module = importlib.import_module(info.name)
        classes += [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]
    return classes


def test_no_private_method_of_a_dependency_is_overridden_outside_the_isolated_modules():
    isolated = {GUARDED[path].__name__ for path in GUARDED}
    found = [f for f in private_overrides(_flexrank_classes()) if f.split(" ")[0].rsplit(".", 2)[0] not in isolated]
    assert not found, f"private dependency methods overridden outside {sorted(GUARDED)}: {found}"


PLANTED = """
from transformers import Trainer

class Resumer(Trainer):
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        pass

def rewind(scheduler):
    state = scheduler.state_dict()
    state["_step_count"] -= 1
    return getattr(scheduler, "_get_lr_called_within_step")
"""


def test_the_scanners_find_a_planted_override_and_string_keyed_edit(tmp_path, monkeypatch):
    (tmp_path / "flexrank_planted.py").write_text(PLANTED)
    monkeypatch.syspath_prepend(str(tmp_path))
    planted = importlib.import_module("flexrank_planted")
    try:
        assert private_overrides([planted.Resumer]) == [
            "flexrank_planted.Resumer._load_from_checkpoint overrides transformers.trainer.Trainer._load_from_checkpoint"]
    finally:
        sys.modules.pop("flexrank_planted", None)
    assert private_uses(PLANTED, _own_private_names()) == [
        "line 10: ['_step_count']", "line 11: getattr(..., '_get_lr_called_within_step')"]
