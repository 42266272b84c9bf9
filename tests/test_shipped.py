"""Recipes and launch configs shipped inside the package: found by name from any folder, as the package's own
files (flexrank/<folder>/<name>). In a checkout those folders are symlinks to the top-level ones, so comparing
contents here would compare a file with itself: tests/test_wheel.py checks that the installed wheel ships every
file setup.cfg's package_data names, byte-identical to the top-level original."""

from pathlib import Path

import pytest

import flexrank

from flexrank.distributed.backends import BACKENDS
from flexrank.launcher.launch import launch_command
from flexrank.shipped import find_recipe, find_shipped_json
from flexrank.config import DistributedConfig
from flexrank.errors import ConfigError


PACKAGE = Path(flexrank.__file__).parent  # the imported package's folder (site-packages/flexrank when installed)


def test_recipe_names_resolve_to_the_shipped_files_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("analogy_elastic", "analogy_elastic.yaml"):
        assert Path(find_recipe(name)) == PACKAGE / "recipes" / "analogy_elastic.yaml"
    assert Path(find_shipped_json("nncf_shears_smollm2.json")) == PACKAGE / "recipes" / "nncf_shears_smollm2.json"
    assert (PACKAGE / "recipes" / "analogy_elastic.yaml").is_file()
    assert (PACKAGE / "recipes" / "nncf_shears_smollm2.json").is_file()
    (tmp_path / "analogy_elastic.yaml").write_text("model: {}\n")  # the user's own file of that name wins
    assert find_recipe("analogy_elastic.yaml") == "analogy_elastic.yaml"
    assert find_shipped_json("missing.json") == "missing.json"  # left for the reader's own error


def test_unknown_recipe_name_lists_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^recipe: got 'analogy_elastik'; allowed: an existing YAML file or a "
                                          r"shipped recipe: analogy_adalora, analogy_elastic, "):
        find_recipe("analogy_elastik")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "single"])
def test_every_backend_launches_with_shipped_files(backend):
    cmd, _ = launch_command(DistributedConfig(backend=backend, nproc=2), ["train"])
    files = [cmd[cmd.index(flag) + 1] for flag in ("--config_file", "--deepspeed_config_file") if flag in cmd]
    assert len(files) == (2 if backend.startswith("zero") else 1)
    for path in files:  # the package's own file (test_wheel.py: the wheel's copy is the top-level original)
        folder = "ds_configs" if path.endswith(".json") else "accelerate_configs"
        # Resolved: the DeepSpeed file is passed resolved (in a checkout, through the symlink to the top level).
        assert Path(path).resolve() == (PACKAGE / folder / Path(path).name).resolve() and Path(path).is_file(), path
