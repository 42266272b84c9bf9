"""Elastic-rank search spaces, as LoNAS/Shears define them through NNCF BootstrapNAS width elasticity.

A space is a list of groups (adapted modules that always share one rank), each with a descending list
of widths, plus training stages that say how many of the largest widths may be sampled. A subnet is
a dict group name -> width; the width is a prefix of lora_A rows / lora_B columns. Sampling is a pure
function of (seed, step), so every process, every micro-batch and a resumed run see the same subnet.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..shipped import find_shipped_json
from .elastic.base_shape import BaseWidths
from .errors import ConfigError

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_keys(key: str, mapping, allowed: set[str]) -> None:
    if not isinstance(mapping, dict):
        raise ConfigError(key, mapping, f"a mapping with keys {sorted(allowed)}")
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", mapping[unknown[0]], f"only the keys {sorted(allowed)}",
                          hint="unknown key")


def _check_widths(key: str, widths, max_rank: int | None = None) -> tuple[int, ...]:
    if (not isinstance(widths, (list, tuple)) or not widths
            or not all(_is_int(w) and w > 0 for w in widths)
            or any(a <= b for a, b in zip(widths, widths[1:]))):
        raise ConfigError(key, widths, "a non-empty list of positive integers in strictly descending order")
    if max_rank is not None and widths[0] > max_rank:
        # A width is a prefix of lora_A's r rows: nothing above r exists to slice.
        raise ConfigError(key, widths, f"widths <= the adapter rank r={max_rank}")
    return tuple(widths)


def _check_stage(key: str, stage: Stage, last: bool, longest: int) -> None:
    if stage.steps is not None and stage.epochs is not None:
        raise ConfigError(key, {"steps": stage.steps, "epochs": stage.epochs}, "either steps or epochs, not both")
    if stage.steps is not None and not (_is_int(stage.steps) and stage.steps >= 1):
        raise ConfigError(f"{key}.steps", stage.steps, "a positive integer")
    if stage.epochs is not None and not (_is_number(stage.epochs) and stage.epochs > 0):
        raise ConfigError(f"{key}.epochs", stage.epochs, "a positive number")
    if not last and stage.steps is None and stage.epochs is None:
        # A stage without a length never ends, so the stages after it would never run.
        raise ConfigError(key, "no steps/epochs", "steps or epochs on every stage but the last")
    if not (_is_int(stage.width_indicator) and 1 <= stage.width_indicator <= longest):
        raise ConfigError(f"{key}.width_indicator", stage.width_indicator,
                          f"an integer in [1, {longest}] (the longest width list)")
    if not (_is_int(stage.sample_rate) and stage.sample_rate >= 1):
        raise ConfigError(f"{key}.sample_rate", stage.sample_rate, "a positive integer (steps between re-sampling)")
    for name in ("init_lr", "epochs_lr"):
        value = getattr(stage, name)
        if value is not None and not (_is_number(value) and value > 0):
            raise ConfigError(f"{key}.{name}", value, "a positive number, or unset to use the training arguments")


def layer_index(module_name: str) -> int | None:
    """Decoder-layer index of a module name: `.layers.N.`, else the first numeric path component."""
    for pattern in (r"(?:^|\.)layers\.(\d+)\.", r"(?:^|\.)(\d+)\."):
        match = re.search(pattern, module_name)
        if match:
            return int(match.group(1))
    return None


@dataclass(frozen=True)
class Group:
    """Modules that always share one rank, and the widths that rank may take (largest first)."""

    name: str
    modules: tuple[str, ...]
    widths: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "modules", tuple(self.modules))
        object.__setattr__(self, "widths", _check_widths(f"group {self.name!r}.widths", self.widths))
        if not self.modules:
            raise ConfigError(f"group {self.name!r}.modules", self.modules, "at least one module name")


@dataclass(frozen=True)
class Stage:
    """A training stage: its length (steps or epochs; None = until the end), how many of the largest
    widths may be sampled, and how many steps one sampled subnet is kept (NNCF `sample_rate`).
    SearchSpace validates stages: what is valid depends on the widths and on the stage's position."""

    steps: int | None
    epochs: float | None
    width_indicator: int
    sample_rate: int = 1
    init_lr: float | None = None
    epochs_lr: float | None = None


@dataclass
class SearchSpace:
    """Groups with their widths, and the training stages; subnet configs are dicts group name -> width."""

    groups: tuple[Group, ...]
    stages: tuple[Stage, ...]

    def __post_init__(self):
        self.groups, self.stages = tuple(self.groups), tuple(self.stages)
        if not self.groups:
            raise ConfigError("search_space.groups", [], "at least one group")
        if not self.stages:
            raise ConfigError("search_space.stages", [], "at least one stage")
        names = [g.name for g in self.groups]
        repeated = [n for i, n in enumerate(names) if n in names[:i]]
        if repeated:
            raise ConfigError("search_space.groups", repeated[0], "unique group names")
        owner: dict[str, str] = {}
        for group in self.groups:
            for module in group.modules:
                if owner.setdefault(module, group.name) != group.name:
                    raise ConfigError("search_space.groups", module,
                                      f"each module in one group; it is in {owner[module]!r} and {group.name!r}")
        longest = max(len(g.widths) for g in self.groups)
        for i, stage in enumerate(self.stages):
            _check_stage(f"search_space.stages[{i}]", stage, i == len(self.stages) - 1, longest)

    def maximal(self) -> dict[str, int]:
        return {g.name: g.widths[0] for g in self.groups}

    def minimal(self) -> dict[str, int]:
        return {g.name: g.widths[-1] for g in self.groups}

    def heuristic(self) -> dict[str, int]:
        # LoNAS/Shears/SQFT "heuristic" subnet: the median of the descending list, the larger one when even.
        return {g.name: g.widths[(len(g.widths) - 1) // 2] for g in self.groups}

    def validate_subnet(self, config: dict[str, int]) -> dict[str, int]:
        """A complete subnet config (every group, each width from its list), in group order."""
        names = [g.name for g in self.groups]
        unknown = [k for k in config if k not in names]
        if unknown:
            raise ConfigError("subnet", unknown[0], f"a group name: {names}")
        result = {}
        for group in self.groups:
            if group.name not in config:
                raise ConfigError(f"subnet.{group.name}", "missing", f"one of {list(group.widths)}")
            if config[group.name] not in group.widths or isinstance(config[group.name], bool):
                raise ConfigError(f"subnet.{group.name}", config[group.name], f"one of {list(group.widths)}")
            result[group.name] = int(config[group.name])
        return result

    def sample(self, seed: int, step: int, width_indicator: int | None = None) -> dict[str, int]:
        """Each group uniform over its first `width_indicator` widths (NNCF get_random_config), drawn from
        a generator seeded by (seed, step) only, so all processes agree without communicating."""
        for key, value in (("seed", seed), ("step", step)):
            if not (_is_int(value) and value >= 0):
                raise ConfigError(key, value, "a non-negative integer")
        if width_indicator is not None and not (_is_int(width_indicator) and width_indicator >= 1):
            raise ConfigError("width_indicator", width_indicator, "a positive integer, or None for all widths")
        rng = np.random.default_rng(np.random.SeedSequence([seed, step]))
        config = {}
        for group in self.groups:
            # Like NNCF, a group shorter than the indicator samples from all its widths.
            n = len(group.widths) if width_indicator is None else min(width_indicator, len(group.widths))
            config[group.name] = group.widths[int(rng.integers(n))]
        return config

    def _locate(self, step: int, steps_per_epoch: int) -> tuple[Stage, int]:
        start = 0
        for stage in self.stages[:-1]:
            if stage.steps is not None:
                length = stage.steps
            else:
                if not (_is_int(steps_per_epoch) and steps_per_epoch >= 1):
                    raise ConfigError("steps_per_epoch", steps_per_epoch, "a positive integer")
                length = math.ceil(stage.epochs * steps_per_epoch)
            if step < start + length:
                return stage, start
            start += length
        return self.stages[-1], start

    def stage_at(self, step: int, steps_per_epoch: int) -> Stage:
        """The stage that `step` (0-based optimizer step) falls in; the last stage lasts forever."""
        return self._locate(step, steps_per_epoch)[0]

    def config_for_step(self, seed: int, step: int, steps_per_epoch: int) -> dict[str, int]:
        """The subnet trained at `step`: re-sampled every `sample_rate` steps, stateless so resume is exact.
        Windows count from the stage's first step, so a new stage starts with a subnet of its own widths."""
        stage, start = self._locate(step, steps_per_epoch)
        return self.sample(seed, step - (step - start) % stage.sample_rate, stage.width_indicator)

    def module_widths(self, config: dict[str, int]) -> dict[str, int]:
        """Module name -> active rank for a subnet config (modules in no group are not listed)."""
        config = self.validate_subnet(config)
        return {module: config[g.name] for g in self.groups for module in g.modules}

    def base_widths(self, config: dict[str, int]) -> BaseWidths:
        """The base model's widths in a subnet config, per layer; empty while only adapter ranks are elastic
        (no group here cuts the base yet)."""
        self.validate_subnet(config)
        return {}


def _group_name(modules: list[str]) -> str:
    # "L3:q_proj+k_proj+v_proj" for a group inside one layer, else just the joined short names.
    short = "+".join(dict.fromkeys(m.rsplit(".", 1)[-1] for m in modules))
    layers = {layer_index(m) for m in modules}
    return f"L{layers.pop()}:{short}" if len(layers) == 1 and None not in layers else short


def _make_groups(members: list[tuple[list[str], tuple[int, ...]]]) -> list[Group]:
    names = [_group_name(modules) for modules, _ in members]
    # Same short names in different parts of the model (e.g. encoder/decoder): number the repeats.
    unique = [n if names.count(n) == 1 else f"{n}#{names[:i].count(n) + 1}" for i, n in enumerate(names)]
    return [Group(name, tuple(modules), widths) for name, (modules, widths) in zip(unique, members)]


def _claim(owner: dict[str, str], modules: list[str], key: str) -> None:
    for module in modules:
        if owner.setdefault(module, key) != key:
            raise ConfigError(key, module, f"each module in one group; {owner[module]} already holds it")


# ---------------------------------------------------------------------------------------------------
# flexrank's YAML form
# ---------------------------------------------------------------------------------------------------

_SPEC_KEYS = {"groups", "widths", "per_layer", "one_rank_per_layer", "stages"}
_SPEC_STAGE_KEYS = {"steps", "epochs", "width_indicator", "sample_rate", "init_lr", "epochs_lr"}


def _match_pattern(key: str, pattern, module_names: list[str]) -> list[str]:
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(key, pattern, "a module-name suffix such as 'q_proj', or '{re}<regex>'")
    if pattern.startswith("{re}"):
        try:
            regex = re.compile(pattern[4:])
        except re.error as err:
            raise ConfigError(key, pattern, "a valid regular expression after {re}", hint=str(err)) from None
        found = [n for n in module_names if regex.search(n)]
    else:
        found = [n for n in module_names if n == pattern or n.endswith("." + pattern)]
    if not found:
        raise ConfigError(key, pattern, f"a pattern matching an adapted module, e.g. {module_names[:3]}",
                          hint="it matches no module")
    return found


def _match_group(key: str, patterns, module_names: list[str]) -> list[str]:
    patterns = [patterns] if isinstance(patterns, str) else patterns
    if not isinstance(patterns, list) or not patterns:
        raise ConfigError(key, patterns, "a non-empty list of module patterns")
    matched = set()
    for j, pattern in enumerate(patterns):
        matched.update(_match_pattern(f"{key}[{j}]", pattern, module_names))
    return [n for n in module_names if n in matched]


def _split_by_layer(key: str, modules: list[str]) -> dict[int, list[str]]:
    by_layer: dict[int, list[str]] = {}
    for module in modules:
        index = layer_index(module)
        if index is None:
            raise ConfigError(key, module, "modules inside numbered layers when per_layer is true",
                              hint="set per_layer: false to group it across the model")
        by_layer.setdefault(index, []).append(module)
    return dict(sorted(by_layer.items()))


def space_from_spec(spec: dict, module_names: list[str], max_rank: int, key: str = "search_space") -> SearchSpace:
    """Build a space from flexrank's YAML form, e.g.
    `{groups: [[q_proj, k_proj, v_proj], [up_proj], [down_proj]], widths: [32, 24, 16], per_layer: true,
      stages: [{steps: 100, width_indicator: 2}, {width_indicator: 3}]}`.
    `key` is where the spec sits in the user's config, for error messages."""
    _check_keys(key, spec, _SPEC_KEYS)
    one_rank = spec.get("one_rank_per_layer", False)
    per_layer = spec.get("per_layer", True)
    for name, value in (("one_rank_per_layer", one_rank), ("per_layer", per_layer)):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}.{name}", value, "true or false")
    module_names = list(module_names)

    if one_rank:
        # NNCF NLS style: one rank per layer, shared by every adapted module of that layer.
        if "groups" in spec or not per_layer:
            raise ConfigError(f"{key}.one_rank_per_layer", True, "no groups and per_layer left true",
                              hint="one_rank_per_layer puts all adapted modules of a layer in one group")
        matched_groups = [module_names]
    else:
        patterns = spec.get("groups")
        if not isinstance(patterns, list) or not patterns:
            raise ConfigError(f"{key}.groups", patterns, "a non-empty list of groups, each a list of module patterns")
        matched_groups = [_match_group(f"{key}.groups[{i}]", g, module_names) for i, g in enumerate(patterns)]

    widths = spec.get("widths")
    if isinstance(widths, list) and widths and all(isinstance(w, list) for w in widths):
        if len(widths) != len(matched_groups):
            raise ConfigError(f"{key}.widths", f"{len(widths)} lists",
                              f"one width list for all groups, or one per group ({len(matched_groups)} groups)")
        widths = [_check_widths(f"{key}.widths[{i}]", w, max_rank) for i, w in enumerate(widths)]
    else:
        widths = [_check_widths(f"{key}.widths", widths, max_rank)] * len(matched_groups)

    owner: dict[str, str] = {}
    members: list[tuple[list[str], tuple[int, ...]]] = []
    for i, modules in enumerate(matched_groups):
        group_key = f"{key}.groups[{i}]"
        _claim(owner, modules, group_key)
        parts = _split_by_layer(group_key, modules).values() if per_layer else [modules]
        members += [(part, widths[i]) for part in parts]

    groups = _make_groups(members)
    longest = max(len(g.widths) for g in groups)
    raw_stages = spec.get("stages", [{}])
    if not isinstance(raw_stages, list) or not raw_stages:
        raise ConfigError(f"{key}.stages", raw_stages, "a non-empty list of stages")
    stages = []
    for i, raw in enumerate(raw_stages):
        stage_key = f"{key}.stages[{i}]"
        _check_keys(stage_key, raw, _SPEC_STAGE_KEYS)
        stage = Stage(steps=raw.get("steps"), epochs=raw.get("epochs"),
                      width_indicator=raw.get("width_indicator", longest), sample_rate=raw.get("sample_rate", 1),
                      init_lr=raw.get("init_lr"), epochs_lr=raw.get("epochs_lr"))
        _check_stage(stage_key, stage, i == len(raw_stages) - 1, longest)
        stages.append(stage)
    return SearchSpace(tuple(groups), tuple(stages))


# ---------------------------------------------------------------------------------------------------
# NNCF BootstrapNAS JSON, as LoNAS / Shears ship it (no dependency on nncf, which dropped NAS in 3.0)
# ---------------------------------------------------------------------------------------------------

_WIDTH_KEY = "bootstrapNAS.training.elasticity.width"
_STAGES_KEY = "bootstrapNAS.training.schedule.list_stage_descriptions"
_NNCF_WIDTH_KEYS = {"overwrite_groups", "overwrite_groups_widths"}
_NNCF_STAGE_KEYS = {"train_dims", "epochs", "depth_indicator", "width_indicator", "reorg_weights", "bn_adapt",
                    "init_lr", "epochs_lr", "sample_rate"}
_SCOPE = re.compile(r"([^/\[\]]+)\[([^\]]*)\]")
_PEFT_PREFIX = "base_model.model."


def _nncf_module_name(key: str, node: str) -> str:
    """`PeftModelForCausalLM/LoraModel[base_model]/.../Linear[q_proj]/ModuleDict[lora_A]/NNCFLinear[default]/linear_0`
    -> `base_model.model.model.layers.3.self_attn.q_proj` (the LoRA-wrapped Linear owning lora_A)."""
    names = []
    for segment in node.split("/")[1:]:  # [0] is the root type, which has no attribute name
        if segment == "ModuleDict[lora_A]":
            return ".".join(names)
        scope = _SCOPE.fullmatch(segment)
        if scope is None:
            break
        names.append(scope.group(2))
    raise ConfigError(key, node, "the NNCF node name of a LoRA A matrix (…/Linear[x]/ModuleDict[lora_A]/…)",
                      hint="flexrank makes only adapter ranks elastic, not base-model widths")


def _strip(name: str) -> str:
    return name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name


def _same_module(a: str, b: str) -> bool:
    # The peft wrapper prefix may differ between the NNCF trace and the model: compare by suffix.
    a, b = _strip(a), _strip(b)
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def _nncf_template(key: str, node: str, module_names: list[str]) -> dict[int, str]:
    """Layer index -> module for a `LayerType[{*}]` entry (the form Shears expands per layer)."""
    if node.count("{*}") != 1:
        raise ConfigError(key, node, "one {*} layer wildcard per node name")
    template = _nncf_module_name(key, node)
    found: dict[int, list[str]] = {}
    for module in module_names:
        for part in dict.fromkeys(p for p in module.split(".") if p.isdigit()):
            if _same_module(module, template.replace("{*}", part)):
                found.setdefault(int(part), []).append(module)
    if not found:
        raise ConfigError(key, node, f"a node matching an adapted module, e.g. {module_names[:3]}",
                          hint="it matches no module")
    for index, modules in found.items():
        if len(modules) > 1:
            raise ConfigError(key, node, "a node matching one module per layer", hint=f"layer {index}: {modules}")
    return {index: modules[0] for index, modules in sorted(found.items())}


def _nncf_group(key: str, entries, module_names: list[str]) -> list[list[str]]:
    """The module lists one `overwrite_groups` entry stands for: one per layer for `{*}` templates."""
    if not isinstance(entries, list) or not entries or not all(isinstance(e, str) for e in entries):
        raise ConfigError(key, entries, "a non-empty list of NNCF node names")
    templated = ["{*}" in e for e in entries]
    if any(templated):
        if not all(templated):
            raise ConfigError(key, entries, "node names that all use the {*} layer wildcard, or none of them",
                              hint="all names of a templated group must be for the same layer")
        by_layer: dict[int, set[str]] = {}
        for j, entry in enumerate(entries):
            for index, module in _nncf_template(f"{key}[{j}]", entry.removeprefix("{re}"), module_names).items():
                by_layer.setdefault(index, set()).add(module)
        return [[n for n in module_names if n in by_layer[i]] for i in sorted(by_layer)]
    matched: set[str] = set()
    for j, entry in enumerate(entries):
        if entry.startswith("{re}"):
            matched.update(_match_pattern(f"{key}[{j}]", entry, module_names))
            continue
        target = _nncf_module_name(f"{key}[{j}]", entry)
        found = [n for n in module_names if _same_module(n, target)]
        if len(found) != 1:
            raise ConfigError(f"{key}[{j}]", entry,
                              f"a node matching exactly one adapted module, e.g. {module_names[:3]}",
                              hint=f"it matches {found or 'no module'}")
        matched.add(found[0])
    return [[n for n in module_names if n in matched]]


def _nncf_stage(key: str, raw, last: bool, longest: int) -> Stage:
    _check_keys(key, raw, _NNCF_STAGE_KEYS)
    train_dims = raw.get("train_dims", ["width"])
    if not isinstance(train_dims, list) or set(train_dims) - {"width"}:
        raise ConfigError(f"{key}.train_dims", train_dims, "['width'] (flexrank's only elastic dimension is rank)")
    for name in ("reorg_weights", "bn_adapt"):
        if raw.get(name, False):
            raise ConfigError(f"{key}.{name}", raw[name], "false",
                              hint="flexrank neither reorders ranks by importance nor adapts batch-norm")

    def unset_if_minus_one(name, default=None):
        # LoNAS/Shears write -1 for "take it from the training arguments".
        value = raw.get(name, default)
        return None if value == -1 else value

    indicator = raw.get("width_indicator", 1)  # NNCF's default: only the largest width
    if indicator == -1:
        indicator = longest
    elif _is_int(indicator) and indicator > longest:
        indicator = longest  # NNCF clamps (Shears ships width_indicator 5 for 3 widths)
    stage = Stage(steps=None, epochs=unset_if_minus_one("epochs", 1), width_indicator=indicator,
                  sample_rate=raw.get("sample_rate", 1), init_lr=unset_if_minus_one("init_lr"),
                  epochs_lr=unset_if_minus_one("epochs_lr"))
    _check_stage(key, stage, last, longest)
    return stage


def _load_nncf(cfg) -> dict:
    if isinstance(cfg, dict):
        return cfg
    try:
        return json.loads(Path(find_shipped_json(str(cfg))).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError("nncf_config", str(cfg), "a readable NNCF JSON file", hint=str(err)) from None


def _dig(cfg: dict, path: str):
    node = cfg
    for i, part in enumerate(path.split(".")):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(path.split(".")[:i + 1])
            raise ConfigError(where, "missing", "a section of the NNCF config", hint=f"needed: {path}")
        node = node[part]
    return node


def space_from_nncf(cfg: dict | str | Path, module_names: list[str], max_rank: int) -> SearchSpace:
    """Build a space from an NNCF BootstrapNAS config (dict or JSON file path), templated (`{re}…[{*}]`,
    one group per layer, as Shears expands it) or fully expanded. A `{re}` entry without `{*}` is a regex
    over torch module names (not NNCF node names). Keys outside the width section and stages are ignored."""
    cfg = _load_nncf(cfg)
    elasticity = _dig(cfg, "bootstrapNAS.training.elasticity")
    dims = elasticity.get("available_elasticity_dims", ["width"])
    if not isinstance(dims, list) or set(dims) - {"width"}:
        raise ConfigError("bootstrapNAS.training.elasticity.available_elasticity_dims", dims, "['width']")
    width = _dig(cfg, _WIDTH_KEY)
    _check_keys(_WIDTH_KEY, width, _NNCF_WIDTH_KEYS)
    raw_groups = _dig(cfg, f"{_WIDTH_KEY}.overwrite_groups")
    raw_widths = _dig(cfg, f"{_WIDTH_KEY}.overwrite_groups_widths")
    if not isinstance(raw_groups, list) or not raw_groups:
        raise ConfigError(f"{_WIDTH_KEY}.overwrite_groups", raw_groups, "a non-empty list of groups of node names")
    if not isinstance(raw_widths, list) or len(raw_widths) != len(raw_groups):
        count = f"{len(raw_widths)} lists" if isinstance(raw_widths, list) else raw_widths
        raise ConfigError(f"{_WIDTH_KEY}.overwrite_groups_widths", count,
                          f"one width list per group ({len(raw_groups)} groups)")
    module_names = list(module_names)

    owner: dict[str, str] = {}
    members: list[tuple[list[str], tuple[int, ...]]] = []
    for i, (entries, widths) in enumerate(zip(raw_groups, raw_widths)):
        widths = _check_widths(f"{_WIDTH_KEY}.overwrite_groups_widths[{i}]", widths, max_rank)
        group_key = f"{_WIDTH_KEY}.overwrite_groups[{i}]"
        for modules in _nncf_group(group_key, entries, module_names):
            _claim(owner, modules, group_key)
            members.append((modules, widths))

    groups = _make_groups(members)
    longest = max(len(g.widths) for g in groups)
    schedule = _dig(cfg, "bootstrapNAS.training").get("schedule", {})
    if not isinstance(schedule, dict):
        raise ConfigError("bootstrapNAS.training.schedule", schedule, "a mapping with list_stage_descriptions")
    # Without a schedule: one stage over all widths for the whole run.
    raw_stages = schedule.get("list_stage_descriptions", [{"width_indicator": -1}])
    if not isinstance(raw_stages, list) or not raw_stages:
        raise ConfigError(_STAGES_KEY, raw_stages, "a non-empty list of stage descriptions")
    stages = [_nncf_stage(f"{_STAGES_KEY}[{i}]", raw, i == len(raw_stages) - 1, longest)
              for i, raw in enumerate(raw_stages)]
    return SearchSpace(tuple(groups), tuple(stages))
