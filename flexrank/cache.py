"""Where flexrank keeps expensive shared artefacts (converted models, fetched data sets)."""

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """`$FLEXRANK_CACHE` (default `~/.cache/flexrank`), joined with `parts` and created."""
    root = Path(os.environ.get("FLEXRANK_CACHE", Path.home() / ".cache" / "flexrank"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
