"""Everything a recipe can be checked for without loading weights, so a bad value fails in seconds, not after
the model loads: `flexrank check`, and `flexrank train` before any model loads or process starts.

- `training` through transformers.TrainingArguments itself: each value against the field's type, then the
  arguments built once (on CPU, reporting to nothing, writing nothing) for conflicting options;
- the model's config.json, and the model built on the meta device with the adapter applied: target modules,
  every search-space group and NNCF node matched against its module names, width lists (descending, <= r);
- the NNCF JSON file readable; data files readable with valid records.
Independent checks all run, and every problem found is reported (one line each).
"""

import dataclasses
import difflib
import functools
import os
import re
import typing

from .config import RunConfig
from .errors import ConfigError, ConfigErrors

CHECKED_ENV = "FLEXRANK_RECIPE_CHECKED"  # set by the launching process: its workers need not check again


def already_checked() -> bool:
    return os.environ.get(CHECKED_ENV) == "1"


def check_recipe(cfg: RunConfig, build_training_arguments: bool = True) -> dict | None:
    """Raise ConfigErrors listing every problem found; `build_training_arguments=False` inside launched worker
    processes, where building TrainingArguments would set up the distributed state. Returns an elastic recipe's
    size report (params / MACs per token of the maximal, heuristic, minimal subnets), else None."""
    problems = training_problems(cfg.training, build_training_arguments)
    nncf = _collect(problems, read_nncf_config, cfg)
    model = _collect(problems, meta_peft_model, cfg)
    names = adapter_names(model) if model is not None else None
    elastic = cfg.adapter.elastic
    space = None
    if names is not None and elastic is not None and (nncf is not None or not elastic.nncf_config):
        space = _collect(problems, check_search_space, cfg, names, nncf, model)
    _collect(problems, check_data, cfg)
    if problems:
        raise ConfigErrors(problems)
    if space is None:
        return None
    from .elastic.cost import CostModel, size_report

    return size_report(CostModel.of(model), space)


def _collect(problems: list, check, *args):
    try:
        return check(*args)
    except ConfigErrors as exc:
        problems.extend(exc.errors)
    except ConfigError as exc:
        problems.append(exc)
    return None


# --- training: transformers.TrainingArguments -------------------------------------------------------------

@functools.cache
def _field_validators() -> dict:
    from pydantic import ConfigDict, TypeAdapter
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    strict = ConfigDict(strict=True, arbitrary_types_allowed=True)  # "16" is no batch size: no coercion
    return {f.name: (hints[f.name], TypeAdapter(hints[f.name], config=strict))
            for f in dataclasses.fields(TrainingArguments) if f.init}


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def training_problems(training: dict, build: bool = True) -> list[ConfigError]:
    """Each value against its TrainingArguments field type; if all fit, the arguments built once."""
    from pydantic import ValidationError

    problems = []
    fields = _field_validators()
    for key, value in training.items():
        if key not in fields:  # unknown keys are reported by config.load_config, with a suggestion
            continue
        hint, validator = fields[key]
        try:
            validator.validate_python(value)
        except ValidationError as exc:
            problems.append(ConfigError(f"training.{key}", value, f"a value of type {_type_name(hint)}",
                                        exc.errors()[0]["msg"]))
    if problems or not build:
        return problems
    from transformers import TrainingArguments

    from .training.arguments import inspection_overrides

    try:  # no side effects: output_dir is not created by the constructor
        TrainingArguments(**{**training, **inspection_overrides()})
    except (TypeError, ValueError, NotImplementedError) as exc:
        message = " ".join(str(exc).split())
        # Name the keys the message is about: by key, else by a (string) value it quotes, e.g. an enum value.
        named = [k for k in training if re.search(rf"\b{re.escape(k)}\b", message)] or \
                [k for k, v in training.items() if isinstance(v, str) and re.search(rf"\b{re.escape(v)}\b", message)]
        problems.append(ConfigError("training" + (f".{named[0]}" if len(named) == 1 else ""),
                                    training[named[0]] if len(named) == 1 else {k: training[k] for k in named},
                                    "options transformers.TrainingArguments accepts together", message[:300]))
    return problems


# --- model and adapter, on the meta device ----------------------------------------------------------------

def adapted_modules(cfg: RunConfig) -> list[str]:
    """Names of the modules the adapter wraps, from the model built on the meta device (no weights read)."""
    return adapter_names(meta_peft_model(cfg))


def adapter_names(peft_model) -> list[str]:
    from .adapters.rank_layer import rank_layers

    layers = rank_layers(peft_model)
    return list(layers) if layers else [n for n, mod in peft_model.named_modules() if hasattr(mod, "lora_A")]


def meta_peft_model(cfg: RunConfig):
    """The model with the adapter applied, built on the meta device from config.json alone (no weights read):
    a model folder holding only a config.json is enough."""
    from accelerate import init_empty_weights
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from .models.assets import resolve_model
    from .adapters.peft_methods import adapter_config

    m = cfg.model
    path = resolve_model(m.name_or_path, m.revision)
    remote = bool(getattr(m, "trust_remote_code", False))
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=remote)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError("model.name_or_path", m.name_or_path, "a model folder whose config.json transformers "
                          "reads", " ".join(str(exc).split())[:300]) from None
    with init_empty_weights():
        if m.task_type == "seq_cls":
            config.num_labels = m.num_labels
            model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=remote)
        else:
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=remote)
        names = [n for n, _ in model.named_modules()]
        linear = sorted({n.rsplit(".", 1)[-1] for n, mod in model.named_modules()
                         if type(mod).__name__ in ("Linear", "Conv1D")})
        _check_target_names(cfg.adapter.target_modules, names, linear)
        try:
            peft_model = get_peft_model(model, adapter_config(cfg.adapter, m.task_type))
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError("adapter.target_modules", cfg.adapter.target_modules,
                              f"'all-linear' or linear modules of the model: {linear}",
                              " ".join(str(exc).split())[:200]) from None
    return peft_model


def _check_target_names(targets, module_names: list[str], linear: list[str]) -> None:
    """peft fails only when no target matches; a misspelt name among good ones would silently adapt less."""
    if not isinstance(targets, list):  # 'all-linear' or a regex: peft's own check covers it
        return
    problems = []
    for i, target in enumerate(targets):
        if not any(n == target or n.endswith("." + target) for n in module_names):
            close = difflib.get_close_matches(str(target), linear, n=1)
            problems.append(ConfigError(f"adapter.target_modules[{i}]", target, f"a module of the model: {linear}",
                                        f"did you mean {close[0]}?" if close else "it matches no module"))
    if problems:
        raise ConfigErrors(problems)


def read_nncf_config(cfg: RunConfig) -> dict | None:
    """The NNCF JSON the recipe names, read and parsed (None when the recipe has none)."""
    path = cfg.adapter.elastic.nncf_config if cfg.adapter.elastic else None
    if not path:
        return None
    from .elastic.search_space import read_nncf_json

    try:
        data = read_nncf_json(path)
    except (OSError, ValueError) as exc:
        raise ConfigError("adapter.elastic.nncf_config", path, "a readable NNCF JSON file",
                          getattr(exc, "strerror", None) or str(exc)) from None
    if not isinstance(data, dict):
        raise ConfigError("adapter.elastic.nncf_config", path, "a JSON object (an NNCF config)")
    return data


def check_search_space(cfg: RunConfig, module_names: list[str], nncf: dict | None, model):
    """The elastic search space built as training will build it (rank and base-width groups), on the meta model."""
    from .elastic.search_space import elastic_space

    e, r = cfg.adapter.elastic, cfg.adapter.r
    try:
        space = elastic_space(e, module_names, r, model, nncf=nncf)
    except ConfigError as exc:
        if nncf is None:
            raise
        raise exc.under(f"adapter.elastic.nncf_config {e.nncf_config}: {exc.key}") from None  # say which file
    if isinstance(e.export_subnet, dict):
        try:
            space.validate_subnet(e.export_subnet)
        except ConfigError as exc:
            raise exc.under(f"adapter.elastic.export_subnet ({exc.key})") from None
    return space


# --- data ---------------------------------------------------------------------------------------------------



def check_data(cfg: RunConfig) -> None:
    """Every data source readable (file or cached hub dataset), its column mapping present, its records valid."""
    from .data.records import validated_records
    from .data.sources import Source, read_source

    d = cfg.data
    if d.task:
        from .data.tasks import task_for

        task_for(cfg)
        return
    columns = dict(d.columns or {})
    if d.datasets:
        sources = [Source(s.path, f"data.datasets.{i}.path", s.name, s.split, s.revision, dict(s.columns or {}))
                   for i, s in enumerate(d.datasets)]
    else:
        sources = [Source(d.path, "data.path", d.name, d.split, d.revision, columns)]
    if d.eval_path:
        sources.append(Source(d.eval_path, "data.eval_path", columns=columns))
    problems = []
    for source in sources:
        try:
            for _ in validated_records(read_source(source), d.format, source.key, source.path):
                pass
        except ConfigError as exc:
            problems.append(exc)
    if problems:
        raise ConfigErrors(problems)
