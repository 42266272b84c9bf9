"""Paths in a recipe are relative to the recipe file and stored absolute, so a run trains, exports and
evaluates from any directory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from flexrank.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path, monkeypatch):
    recipes, elsewhere = tmp_path / "recipes", tmp_path / "elsewhere"
    (recipes / "model").mkdir(parents=True)
    elsewhere.mkdir()
    (recipes / "recipe.yaml").write_text(yaml.safe_dump({
        "model": {"name_or_path": "model"},
        "data": {"path": "data/train.jsonl", "eval_path": "../shared/eval.jsonl"},
        "adapter": {"method": "elastic", "elastic": {"nncf_config": "space.json"}},
        "distributed": {"deepspeed_config": "ds.json"},
    }))
    monkeypatch.chdir(elsewhere)
    cfg = load_config("../recipes/recipe.yaml", ["data.eval_path=mine.jsonl"])
    assert cfg.model.name_or_path == str(recipes / "model")  # an existing folder next to the recipe
    assert cfg.data.path == str(recipes / "data" / "train.jsonl")
    assert cfg.data.eval_path == str(elsewhere / "mine.jsonl")  # --set values: relative to where flexrank runs
    assert cfg.adapter.elastic.nncf_config == str(recipes / "space.json")
    assert cfg.distributed.deepspeed_config == str(recipes / "ds.json")


def test_model_names_and_hub_ids_stay_as_written(tmp_path):
    for name in ("smollm2-135m-instruct", "meta-llama/Llama-3.2-1B"):
        (tmp_path / "r.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": name}}))
        assert load_config(tmp_path / "r.yaml").model.name_or_path == name


def _flexrank(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "flexrank", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def test_recipe_elsewhere_trains_exports_and_evaluates_from_a_third_folder(tiny_llama_dir, tmp_path):
    recipe_dir, work, third = tmp_path / "recipe", tmp_path / "work", tmp_path / "third"
    for folder in (recipe_dir, work, third):
        folder.mkdir()
    (recipe_dir / "model").symlink_to(tiny_llama_dir)
    (recipe_dir / "data.jsonl").write_text("\n".join(
        json.dumps({"instruction": f"Add {i} and {i}.", "output": str(2 * i)}) for i in range(24)))
    (recipe_dir / "space.json").write_text((ROOT / "recipes" / "nncf_shears_smollm2.json").read_text())
    (recipe_dir / "run.yaml").write_text(yaml.safe_dump({
        "model": {"name_or_path": "./model"},
        "data": {"path": "data.jsonl", "eval_size": 4},
        "adapter": {"method": "elastic", "r": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "up_proj",
                                                                     "down_proj"],
                    "elastic": {"nncf_config": "space.json", "evaluate_subnets": []}},
        "eval": {"before": False, "after": False, "batch_size": 4},
        "training": {"output_dir": "out", "max_steps": 2, "per_device_train_batch_size": 4, "report_to": []},
    }))
    _flexrank(["train", "../recipe/run.yaml"], work)
    run = work / "out"  # output_dir, like every training argument, is relative to where flexrank runs
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["path"] == str(recipe_dir / "data.jsonl")
    assert saved["adapter"]["elastic"]["nncf_config"] == str(recipe_dir / "space.json")
    assert saved["model"]["name_or_path"] == str(recipe_dir / "model")

    _flexrank(["export", str(run), "--subnet", "minimal", "--out", "adapter"], third)
    assert json.loads((third / "adapter" / "flexrank_export.json").read_text())["total_rank"] == 2 * 5 * 8
    proc = _flexrank(["eval", str(run), "--subnet", "minimal"], third)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["subnet"] == "minimal" and result["perplexity"] > 1  # evaluated on the recipe's data file
