"""File paths in a recipe are relative to the recipe file (not to where flexrank runs); the resolved config,
and so the run's config.yaml, holds them absolute, so export and eval work from any directory."""

import os
from pathlib import Path

# Keys always naming a file; model.name_or_path, data paths (hub dataset ids) and distributed.backend only sometimes do.
_FILE_KEYS = (("adapter", "elastic", "nncf_config"), ("distributed", "deepspeed_config"))


def _absolute(value, base: Path):
    if not isinstance(value, str) or not value:
        return value
    path = Path(value).expanduser()
    return os.path.abspath(base / path)  # normalised, links kept as written


def _names_local_path(value, base: Path) -> bool:
    """A bundled model name or a hub id stays as written; a folder that exists, or an explicit ./ ../ ~ path,
    is a local path."""
    if not isinstance(value, str) or not value:
        return False
    return value.startswith((".", "~", "/")) or (base / value).exists()


def _names_data_file(value, base: Path) -> bool:
    """A data path is a file unless it reads as a hub dataset id (org/name, no data file extension), and is no
    local path."""
    from .data.sources import is_hub_dataset

    return not (isinstance(value, str) and is_hub_dataset(value)) or _names_local_path(value, base)


def _parent(raw: dict, keys: tuple[str, ...]) -> dict | None:
    node = raw
    for key in keys[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def resolve_recipe_paths(raw: dict, base: str | Path) -> None:
    """Make the recipe's relative file paths absolute against `base` (the recipe's folder; the current
    directory for --set overrides and recipes given as dicts), in place."""
    base = Path(os.path.abspath(base))
    for keys in _FILE_KEYS:
        node = _parent(raw, keys)
        if node is not None and keys[-1] in node:
            node[keys[-1]] = _absolute(node[keys[-1]], base)
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    sources = [data] + [s for s in data.get("datasets") or [] if isinstance(s, dict)]
    for node, key in [(n, k) for n in sources for k in ("path", "eval_path") if k in n]:
        if _names_data_file(node[key], base):
            node[key] = _absolute(node[key], base)
    model = _parent(raw, ("model", "name_or_path"))
    if model is not None and _names_local_path(model.get("name_or_path"), base):
        model["name_or_path"] = _absolute(model["name_or_path"], base)
    dist = _parent(raw, ("distributed", "backend"))
    if dist is not None and isinstance(dist.get("backend"), str) and dist["backend"].endswith((".yaml", ".yml")):
        dist["backend"] = _absolute(dist["backend"], base)
