"""Files shipped inside the flexrank package: accelerate YAMLs, DeepSpeed JSONs, the ready recipes and the sbatch
scripts.

One source: the repository's top-level `accelerate_configs/`, `ds_configs/`, `recipes/` and `slurm/` (the files users copy);
`flexrank/<folder>` are symlinks to them, so a checkout, an editable install and a wheel all read the same files.
"""

from importlib.resources import files
from pathlib import Path

from .errors import ConfigError

ACCELERATE_CONFIGS, DS_CONFIGS, RECIPES, SLURM = "accelerate_configs", "ds_configs", "recipes", "slurm"


def shipped_file(folder: str, name: str) -> Path:
    """A real filesystem path (accelerate and DeepSpeed read the files by name, in other processes). pip
    installs wheels unpacked, so the package's files are plain files."""
    return Path(str(files("flexrank") / folder / name))


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in Path(str(files("flexrank") / RECIPES)).glob("*.yaml"))


def find_shipped_json(path: str) -> str:
    """A JSON file a recipe names (an NNCF config): as given when it exists, else a shipped one of that bare name
    (the shipped Shears recipe names `nncf_shears_smollm2.json`, wherever flexrank is installed)."""
    if Path(path).expanduser().exists() or "/" in path or not shipped_file(RECIPES, path).is_file():
        return path
    return str(shipped_file(RECIPES, path))


def find_recipe(recipe: str) -> str:
    """A recipe file as given, or the name of a shipped one (`analogy_elastic` or `analogy_elastic.yaml`)."""
    if Path(recipe).expanduser().is_file():
        return recipe
    name = recipe.removesuffix(".yaml").removesuffix(".yml")
    if "/" not in recipe and name in shipped_recipes():
        return str(shipped_file(RECIPES, name + ".yaml"))
    raise ConfigError("recipe", recipe, f"an existing YAML file or a shipped recipe: {', '.join(shipped_recipes())}")
