"""Hub ids (`org/name`, optional `model.revision`) from an HF cache built here (the hub's own folder layout:
models--org--name/refs/<ref>, snapshots/<commit>/), fully offline: resolved once by the launching process, the
commit recorded in config.yaml and handed to the launched processes; a missing model fails with one line."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import tiny_llama_config
from dist_helpers import free_port, metrics, recipe

from flexrank.config import load_config
from flexrank.errors import ConfigError

MAIN, V1 = "a" * 8 + "0123456789abcdef" * 2, "b" * 8 + "fedcba9876543210" * 2  # commits (40 hex digits)
REPO = "acme/tiny-llama"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tiny_llama_dir):
    """main -> the 2-layer tiny Llama; tag v1 -> a 1-layer one (same tokenizer), so the snapshot used shows."""
    from transformers import LlamaForCausalLM

    hub = tmp_path_factory.mktemp("hf") / "hub"
    repo = hub / "models--acme--tiny-llama"
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / MAIN)
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / V1)
    torch.manual_seed(1)
    one_layer = LlamaForCausalLM(tiny_llama_config(vocab_size=LlamaForCausalLM.config_class.from_pretrained(
        tiny_llama_dir).vocab_size, layers=1))
    for f in (repo / "snapshots" / V1).glob("model*.safetensors"):
        f.unlink()
    one_layer.save_pretrained(repo / "snapshots" / V1)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(V1)
    return hub


def base_parameters(folder) -> int:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).num_parameters()


def offline_env(hub) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def hub_recipe(tmp_path, tiny_llama_dir, name=REPO):
    path = recipe(tmp_path, tiny_llama_dir, "lora", max_steps=2)
    raw = yaml.safe_load(path.read_text())
    raw["model"] = {"name_or_path": name}
    path.write_text(yaml.safe_dump(raw))
    return path


def test_hub_id_trains_offline_on_two_processes_from_the_pinned_commit(hub_cache, tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "flexrank", "train", str(hub_recipe(tmp_path, tiny_llama_dir)), "--nproc", "2",
         "--backend", "ddp", "--main-process-port", str(free_port()), "--set", f"training.output_dir={out}"],
        capture_output=True, text=True, timeout=600, env=offline_env(hub_cache), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    launch = next(line for line in proc.stdout.splitlines() if line.startswith("[flexrank] launching:"))
    assert "model.revision=" in launch and MAIN in launch  # the launched processes get the commit, not "main"
    saved = yaml.safe_load((out / "config.yaml").read_text())["model"]
    assert (saved["name_or_path"], saved["revision"]) == (REPO, MAIN)
    m = metrics(out)
    assert m["train"]["world_size"] == 2 and len(m["train"]["losses"]) == 2
    frozen = m["parameters"]["total"] - m["parameters"]["trainable"]
    assert frozen == base_parameters(tiny_llama_dir)


def test_revision_tag_resolves_to_its_commit(hub_cache, tiny_llama_dir, tmp_path, monkeypatch):
    """In-process (huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE when imported: set its constants)."""
    from huggingface_hub import constants

    from flexrank.models.assets import pin_hub_model
    from flexrank.adapters.registry import load_run
    from flexrank.run import train

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cfg = load_config(hub_recipe(tmp_path, tiny_llama_dir), [f"training.output_dir={tmp_path / 'run'}",
                                                              "model.revision=v1", "training.max_steps=1"])
    assert pin_hub_model(cfg.model) == [f"model.revision='{V1}'"]
    m = train(cfg)
    assert m["parameters"]["total"] - m["parameters"]["trainable"] == base_parameters(
        hub_cache / "models--acme--tiny-llama" / "snapshots" / V1)
    assert load_config(tmp_path / "run" / "config.yaml").model.revision == V1
    finished = load_run(tmp_path / "run")
    cfg, peft_model = finished.cfg, finished.model  # as flexrank eval / export do: the recorded commit
    assert cfg.model.revision == V1 and peft_model.get_base_model().config.num_hidden_layers == 1


def test_offline_and_not_cached_fails_with_one_line_before_any_work(hub_cache, tiny_llama_dir, tmp_path):
    path = hub_recipe(tmp_path, tiny_llama_dir, name="acme/not-cached")
    proc = subprocess.run([sys.executable, "-m", "flexrank", "train", str(path), "--nproc", "2", "--backend", "ddp"],
                          capture_output=True, text=True, timeout=300, env=offline_env(hub_cache), cwd=tmp_path)
    assert proc.returncode == 2 and "launching" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("flexrank: error: model.name_or_path: got 'acme/not-cached'"), proc.stderr
    assert "HF_HUB_OFFLINE is set" in lines[-1] and "flexrank prepare --model acme/not-cached" in lines[-1]
    assert "Traceback" not in proc.stderr


def test_prepare_model_finds_the_cached_snapshot(hub_cache, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flexrank", "prepare", "--model", REPO, "--revision", "v1"],
                          capture_output=True, text=True, timeout=300, env=offline_env(hub_cache), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (f"[flexrank] ready: {REPO} commit {V1} in "
                                   f"{hub_cache / 'models--acme--tiny-llama' / 'snapshots' / V1}")


@pytest.mark.parametrize("name, source", [("acme/tiny-llama", "hub"), ("smollm2-135m-instruct", "bundled"),
                                          ("./acme/tiny-llama", "local"), ("/models/llama", "local"),
                                          ("acme/tiny/llama", "local"), ("tiny-llama", "local")])
def test_model_source(name, source):
    from flexrank.models.assets import model_source

    assert model_source(name) == source


def test_revision_needs_a_hub_id():
    with pytest.raises(ConfigError, match=r"^model.revision: got 'v1'; allowed: only with a hub id"):
        load_config(raw={"model": {"name_or_path": "smollm2-135m-instruct", "revision": "v1"}})
    assert load_config(raw={"model": {"name_or_path": REPO}}).model.trust_remote_code is False


CUSTOM_CONFIG = '''from transformers import LlamaConfig


class TinyConfig(LlamaConfig):
    model_type = "flexrank_tiny"
'''
CUSTOM_MODEL = '''from transformers import LlamaForCausalLM

from .configuration_tiny import TinyConfig


class TinyForCausalLM(LlamaForCausalLM):
    config_class = TinyConfig
'''


def test_custom_model_code_runs_only_with_trust_remote_code(tiny_llama_dir, tmp_path):
    """A model whose model_type transformers does not know, with its own code (auto_map), as hub repos ship it."""
    import json

    from flexrank.models.loading import load_base_model, load_tokenizer

    folder = tmp_path / "custom"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "configuration_tiny.py").write_text(CUSTOM_CONFIG)
    (folder / "modeling_tiny.py").write_text(CUSTOM_MODEL)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({
        **config, "model_type": "flexrank_tiny", "architectures": ["TinyForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_tiny.TinyConfig",
                     "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}}))
    model_cfg = load_config(raw={"model": {"name_or_path": str(folder)}}).model
    with pytest.raises(ConfigError, match=r"^model.trust_remote_code: got False; allowed: true for a model that "
                                          r"ships its own modelling code \(model_type 'flexrank_tiny'"):
        load_tokenizer(model_cfg)
    model_cfg = load_config(raw={"model": {"name_or_path": str(folder), "trust_remote_code": True}}).model
    assert type(load_base_model(model_cfg, load_tokenizer(model_cfg))).__name__ == "TinyForCausalLM"
