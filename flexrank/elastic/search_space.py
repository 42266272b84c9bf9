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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..shipped import find_shipped_json
from .base_shape import BaseWidths, LayerWidths, layer_index
from ..errors import ConfigError

if TYPE_CHECKING:
    from .base_masks import BaseTarget

BaseTargets = dict[tuple[int, str], "BaseTarget"]  # (layer index, "mlp" | "attention") -> target

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


@dataclass(frozen=True)
class Group:
    """Modules that always share one rank, and the widths that rank may take (largest first). A base group
    (`base` = "mlp" or "attention") instead cuts one layer's base width: its module is the projection whose
    input is masked (elastic/base_masks.py), its widths are channel counts of the base model."""

    name: str
    modules: tuple[str, ...]
    widths: tuple[int, ...]
    base: str | None = None

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
    """Groups with their widths, and the training stages; subnet configs are dicts group name -> width.
    `dynamic_inputs` (NNCF's add_dynamic_inputs): module name -> the base group whose width its input follows."""

    groups: tuple[Group, ...]
    stages: tuple[Stage, ...]
    dynamic_inputs: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.groups, self.stages = tuple(self.groups), tuple(self.stages)
        self.dynamic_inputs = dict(self.dynamic_inputs)
        if not self.groups:
            raise ConfigError("search_space.groups", [], "at least one group")
        if not self.stages:
            raise ConfigError("search_space.stages", [], "at least one stage")
        names = [g.name for g in self.groups]
        repeated = [n for i, n in enumerate(names) if n in names[:i]]
        if repeated:
            raise ConfigError("search_space.groups", repeated[0], "unique group names")
        owner: dict[tuple, str] = {}
        for group in self.groups:
            for module in group.modules:
                if owner.setdefault((group.base, module), group.name) != group.name:
                    raise ConfigError("search_space.groups", module, "each module in one group; it is in "
                                      f"{owner[group.base, module]!r} and {group.name!r}")
        longest = max(len(g.widths) for g in self.groups)
        for i, stage in enumerate(self.stages):
            _check_stage(f"search_space.stages[{i}]", stage, i == len(self.stages) - 1, longest)
        base = {g.name: g for g in self.groups if g.base is not None}
        for module, group in self.dynamic_inputs.items():
            # flexrank cuts a base width by masking the input of one projection (base_masks.py): that projection's
            # input is the only one a base group can make dynamic.
            if group not in base or base[group].modules != (module,):
                raise ConfigError("search_space.dynamic_inputs", {module: group},
                                  "the projection a base group masks, mapped to that group")

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
        return {module: config[g.name] for g in self.groups if g.base is None for module in g.modules}

    def base_module_widths(self, config: dict[str, int]) -> dict[str, int]:
        """Masked projection's module name -> input channels kept, for the base groups (empty if none)."""
        config = self.validate_subnet(config)
        return {module: config[g.name] for g in self.groups if g.base is not None for module in g.modules}

    def dynamic_input_widths(self, config: dict[str, int]) -> dict[str, int]:
        """Module name -> its input width in a subnet config, for the modules `dynamic_inputs` names."""
        config = self.validate_subnet(config)
        return {module: config[group] for module, group in self.dynamic_inputs.items()}

    def base_widths(self, config: dict[str, int]) -> BaseWidths:
        """The base model's widths in a subnet config, per layer (layers without base groups are absent)."""
        config = self.validate_subnet(config)
        layers: dict[int, dict[str, int]] = {}
        for g in self.groups:
            if g.base is not None:
                layers.setdefault(layer_index(g.modules[0]), {})[g.base] = config[g.name]
        return {i: LayerWidths(**kinds) for i, kinds in sorted(layers.items())}


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
# Base widths (LoNAS): one group per layer and kind, named e.g. "L3:mlp"
# ---------------------------------------------------------------------------------------------------

_BASE_KINDS = ("mlp", "attention")
_SIZE_NAMES = {"mlp": "MLP intermediate size", "attention": "attention width (heads x head_dim)"}


def _base_group(key: str, target: "BaseTarget", widths) -> Group:
    """A base group for one target, its widths checked against the model: a width cannot exceed what the layer
    has, and an attention width must be whole heads."""
    name = f"L{target.layer}:{target.kind}"
    widths = _check_widths(key, widths)
    for width in widths:
        if width > target.size or width % target.unit:
            unit = f", a multiple of {target.unit}" if target.unit > 1 else ""
            raise ConfigError(key, width, f"widths <= the model's {_SIZE_NAMES[target.kind]} {target.size}{unit}",
                              hint=f"group {name!r} ({target.module})")
    return Group(name, (target.module,), widths, base=target.kind)


def _resolve_width(key: str, value, target: "BaseTarget") -> int:
    # An int is a channel count; a float in (0, 1] a fraction of the layer's width, rounded to whole units.
    if _is_int(value):
        return value
    if isinstance(value, float) and 0 < value <= 1:
        return max(1, round(value * target.size / target.unit)) * target.unit
    raise ConfigError(key, value, "a width: a positive integer (channels) or a fraction in (0, 1]")


def base_groups_from_spec(spec, targets: BaseTargets, key: str = "adapter.elastic.base_widths") -> list[Group]:
    """Base groups from the recipe form `{mlp: [1.0, 0.75, 0.5], attention: [...]}` (every layer, the same
    list) or per layer `{mlp: {0: [1536, 768], 5: [1536, 1152]}}`; widths are channel counts or fractions."""
    _check_keys(key, spec, set(_BASE_KINDS))
    groups = []
    for kind in _BASE_KINDS:
        if kind not in spec:
            continue
        available = {i: t for (i, k), t in targets.items() if k == kind}
        if not available:
            raise ConfigError(f"{key}.{kind}", spec[kind], f"no {kind} key: this model has no elastic {kind} "
                              "projection flexrank knows (Llama family, BLOOM, BERT)")
        per_layer = spec[kind]
        if isinstance(per_layer, list):
            per_layer = {i: per_layer for i in available}
        if not isinstance(per_layer, dict) or not per_layer:
            raise ConfigError(f"{key}.{kind}", per_layer, "a width list, or a mapping layer index -> width list")
        for raw_layer, widths in per_layer.items():
            layer = int(raw_layer) if str(raw_layer).isdigit() else None
            if layer not in available:
                raise ConfigError(f"{key}.{kind}", raw_layer, f"a layer index in {sorted(available)}")
            item = f"{key}.{kind}" if isinstance(spec[kind], list) else f"{key}.{kind}.{raw_layer}"
            if not isinstance(widths, list):
                raise ConfigError(item, widths, "a list of widths")
            target = available[layer]
            groups.append(_base_group(item, target, [_resolve_width(item, w, target) for w in widths]))
    return sorted(groups, key=lambda g: layer_index(g.modules[0]))


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


def space_from_spec(spec: dict, module_names: list[str], max_rank: int, key: str = "search_space",
                    base_groups: list[Group] = ()) -> SearchSpace:
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

    groups = _make_groups(members) + list(base_groups)
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
_NNCF_WIDTH_KEYS = {"overwrite_groups", "overwrite_groups_widths", "add_dynamic_inputs"}
_NNCF_STAGE_KEYS = {"train_dims", "epochs", "depth_indicator", "width_indicator", "reorg_weights", "bn_adapt",
                    "init_lr", "epochs_lr", "sample_rate"}
_SCOPE = re.compile(r"([^/\[\]]+)\[([^\]]*)\]")
_PEFT_PREFIX = "base_model.model."


_NODE_ROLES = {"ModuleDict[lora_A]": "lora_A", "ModuleDict[lora_B]": "lora_B",
               "NNCFUserSelfLinear[self_linear]": "base"}  # LoNAS' peft patch moves the base weight there


def _nncf_node(key: str, node: str) -> tuple[str, str]:
    """`PeftModelForCausalLM/LoraModel[base_model]/.../Linear[q_proj]/ModuleDict[lora_A]/NNCFLinear[default]/linear_0`
    -> (`base_model.model.model.layers.3.self_attn.q_proj`, "lora_A"): the LoRA-wrapped Linear and which of its
    parts the node is: lora_A, lora_B, or base (`…/NNCFUserSelfLinear[self_linear]/linear_0`, `…/Linear[x]/linear_0`)."""
    names = []
    for segment in node.split("/")[1:]:  # [0] is the root type, which has no attribute name
        if segment in _NODE_ROLES and names:
            return ".".join(names), _NODE_ROLES[segment]
        scope = _SCOPE.fullmatch(segment)
        if scope is None:
            if names and re.fullmatch(r"linear_\d+", segment):  # the operation of a plain base Linear
                return ".".join(names), "base"
            break
        names.append(scope.group(2))
    raise ConfigError(key, node, "the NNCF node name of a LoRA matrix (…/Linear[x]/ModuleDict[lora_A]/…) or of a "
                                 "base Linear (…/Linear[x]/NNCFUserSelfLinear[self_linear]/linear_0)")


def _nncf_module_name(key: str, node: str) -> str:
    """The module owning a lora_A node (an adapter-rank group's entry)."""
    module, role = _nncf_node(key, node)
    if role != "lora_A":
        raise ConfigError(key, node, "a lora_A node in a templated ({*}) or rank group",
                          hint="base-width groups name one layer each, as LoNAS writes them")
    return module


def _is_base_group(key: str, entries) -> bool:
    """A group naming the base weight or lora_B (LoNAS' MLP / attention width groups), not only lora_A."""
    return isinstance(entries, list) and any(
        isinstance(e, str) and not e.startswith("{re}") and "{*}" not in e and _nncf_node(f"{key}[{j}]", e)[1] != "lora_A"
        for j, e in enumerate(entries))


def _nncf_base_group(key: str, widths_key: str, entries: list[str], widths, targets: BaseTargets | None) -> Group:
    """The base group of a LoNAS width group: all its nodes in one layer's MLP, or one layer's attention."""
    places = set()
    for j, entry in enumerate(entries):
        if not isinstance(entry, str) or entry.startswith("{re}") or "{*}" in entry:
            raise ConfigError(f"{key}[{j}]", entry, "an explicit NNCF node name in a base-width group")
        module = _nncf_node(f"{key}[{j}]", entry)[0]
        kind = "attention" if re.search(r"(?:^|\.)[^.]*(?:attn|attention)[^.]*\.", module) else "mlp"
        places.add((layer_index(module), kind))
    if len(places) != 1:
        raise ConfigError(key, sorted(places, key=str), "nodes of one layer's MLP or of one layer's attention")
    place = places.pop()
    if targets is None:
        raise ConfigError(key, entries[0], "adapter-rank groups only", hint="base widths are not supported here")
    if place not in targets:
        raise ConfigError(key, entries[0], f"a node in a layer with an elastic {place[1]} width",
                          hint=f"layers with one: {sorted(i for i, k in targets if k == place[1])}")
    return _base_group(widths_key, targets[place], widths)


def _nncf_dynamic_inputs(key: str, entries, groups: list[Group]) -> dict[str, str]:
    """NNCF's `add_dynamic_inputs` (LoNAS's BERT configs list each layer's attention-output dense): nodes whose
    input width NNCF sets from the nearest masked output before them, i.e. their layer's base group. Each must be
    the projection one of this config's base groups masks; maps it to that group."""
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise ConfigError(key, entries, "a list of NNCF node names of base Linear layers")
    masked = {g.modules[0]: g for g in groups if g.base is not None}
    found: dict[str, str] = {}
    for j, entry in enumerate(entries):
        module, role = _nncf_node(f"{key}[{j}]", entry)
        owner = [g for name, g in masked.items() if _same_module(name, module)]
        if role != "base" or len(owner) != 1:
            feeds = sorted(f"{g.name}: {g.modules[0]}" for g in masked.values())[:3]
            raise ConfigError(f"{key}[{j}]", entry, "the base Linear whose input a base-width group of this config "
                              "cuts (a layer's attention-output projection with an attention group, or its MLP "
                              "down projection with an MLP group)",
                              hint=f"those here: {feeds}" if feeds else "this config has no base-width group")
        found[owner[0].modules[0]] = owner[0].name
    return found


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


_TRAILING_COMMA = re.compile(r",(\s*[}\]])")


def read_nncf_json(path: str | Path) -> dict:
    """An NNCF JSON as LoNAS ships it: one of its BLOOM configs has trailing commas, which json rejects."""
    text = Path(path).read_text()
    try:
        return json.loads(text)
    except ValueError:
        # Node names never contain ",]" or ",}", so dropping a comma before a closing bracket is safe.
        return json.loads(_TRAILING_COMMA.sub(r"\1", text))


def _load_nncf(cfg) -> dict:
    if isinstance(cfg, dict):
        return cfg
    try:
        return read_nncf_json(find_shipped_json(str(cfg)))
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


def space_from_nncf(cfg: dict | str | Path, module_names: list[str], max_rank: int,
                    base_targets: BaseTargets | None = None, base_groups: list[Group] = ()) -> SearchSpace:
    """Build a space from an NNCF BootstrapNAS config (dict or JSON file path), templated (`{re}…[{*}]`,
    one group per layer, as Shears expands it) or fully expanded. A `{re}` entry without `{*}` is a regex
    over torch module names (not NNCF node names). Keys outside the width section and stages are ignored.
    Groups naming base weights or lora_B (LoNAS) are base-width groups, checked against `base_targets`;
    `add_dynamic_inputs` nodes must be the projections those groups mask (space.dynamic_inputs)."""
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
    found_base: list[Group] = []
    for i, (entries, widths) in enumerate(zip(raw_groups, raw_widths)):
        widths_key = f"{_WIDTH_KEY}.overwrite_groups_widths[{i}]"
        group_key = f"{_WIDTH_KEY}.overwrite_groups[{i}]"
        if _is_base_group(group_key, entries):
            found_base.append(_nncf_base_group(group_key, widths_key, entries, widths, base_targets))
            continue
        widths = _check_widths(widths_key, widths, max_rank)
        for modules in _nncf_group(group_key, entries, module_names):
            _claim(owner, modules, group_key)
            members.append((modules, widths))

    groups = _make_groups(members) + found_base + list(base_groups)
    dynamic = _nncf_dynamic_inputs(f"{_WIDTH_KEY}.add_dynamic_inputs", width["add_dynamic_inputs"], groups) \
        if "add_dynamic_inputs" in width else {}
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
    return SearchSpace(tuple(groups), tuple(stages), dynamic)


def elastic_space(elastic, module_names: list[str], max_rank: int, model, nncf: dict | None = None) -> SearchSpace:
    """An elastic run's space as training builds it: rank groups from `search_space` or the NNCF JSON (`nncf`, if
    already read), base groups from `base_widths` and the JSON's base nodes, checked against `model` (real or meta)."""
    from .base_masks import find_base_targets

    targets = find_base_targets(model)
    base = base_groups_from_spec(elastic.base_widths, targets) if elastic.base_widths is not None else []
    if elastic.nncf_config:
        return space_from_nncf(nncf if nncf is not None else elastic.nncf_config, module_names, max_rank,
                               base_targets=targets, base_groups=base)
    return space_from_spec(elastic.search_space, module_names, max_rank, key="adapter.elastic.search_space",
                           base_groups=base)
