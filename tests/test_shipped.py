"""Recipes and launch configs shipped inside the package: found by name from any folder, the same files as the
repository's top-level folders (tests/test_wheel.py checks the installed wheel)."""

import pytest
from dist_helpers import ROOT

from flexrank.launcher.launch import BACKENDS, launch_command
from flexrank.shipped import find_recipe, find_shipped_json
from flexrank.config import DistributedConfig
from flexrank.errors import ConfigError


def test_recipe_names_resolve_to_the_shipped_files_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("analogy_elastic", "analogy_elastic.yaml"):
        assert open(find_recipe(name), "rb").read() == (ROOT / "recipes" / "analogy_elastic.yaml").read_bytes()
    assert open(find_shipped_json("nncf_shears_smollm2.json"), "rb").read() == \
        (ROOT / "recipes" / "nncf_shears_smollm2.json").read_bytes()
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
    for path in files:  # the package's file, identical to the top-level one users copy
        folder = "ds_configs" if path.endswith(".json") else "accelerate_configs"
        assert open(path, "rb").read() == (ROOT / folder / path.rsplit("/", 1)[1]).read_bytes()
