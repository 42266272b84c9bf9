"""Export -> stock peft, as a user without flexrank loads it: a fresh process with plain transformers + peft
(tests/scripts/stock_peft_logits.py) must give the trained flexrank model's logits, for SoRA, AdaLoRA, a QLoRA
(bitsandbytes NF4) base and an elastic subnet given as JSON to `flexrank export --subnet`. A run whose every
rank was pruned has nothing to export: a one-line error, exit 2, no folder."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_helpers import recipe

from flexrank.config import load_config
from flexrank.adapters.registry import load_run
from flexrank.run import train

STOCK = Path(__file__).parent / "scripts" / "stock_peft_logits.py"
IDS = torch.randint(0, 2000, (2, 12), generator=torch.Generator().manual_seed(5)).tolist()
SUBNET = {"L0:q_proj+k_proj+v_proj": 6, "L1:q_proj+k_proj+v_proj": 4, "L0:up_proj": 8, "L1:up_proj": 4,
          "L0:down_proj": 4, "L1:down_proj": 6}
NF4 = {"model.quantization": {"bnb_4bit_compute_dtype": "float32"}}


def _train(model_dir, tmp: Path, method: str, name: str, **overrides) -> Path:
    out = tmp / name
    cfg = load_config(recipe(tmp, model_dir, method, max_steps=4),
                      [f"training.output_dir={out}"] + [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    train(cfg)
    return out


def _flexrank(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flexrank", *args], capture_output=True, text=True)


def _trained_logits(run_dir: Path, subnet=None) -> torch.Tensor:
    """The trained rank-controlled model (flexrank's own layer, masks and gates restored from the run)."""
    finished = load_run(run_dir)
    model, controller = finished.model, finished.controller
    if subnet is not None:
        controller.activate(subnet)
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor(IDS)).logits


@pytest.fixture(scope="module")
def exported(tiny_llama_dir, tmp_path_factory):
    """Four tiny runs, their adapters, and the logits stock peft gives for each in one fresh process."""
    tmp = tmp_path_factory.mktemp("export")
    runs = {"sora": _train(tiny_llama_dir, tmp, "sora", "sora"),
            "adalora": _train(tiny_llama_dir, tmp, "adalora", "adalora"),
            "qlora_sora": _train(tiny_llama_dir, tmp, "sora", "qlora_sora", **NF4),
            "elastic": _train(tiny_llama_dir, tmp, "elastic", "elastic")}
    adapters = {name: run / "adapter" for name, run in runs.items()}
    adapters["elastic"] = tmp / "elastic_json"
    proc = _flexrank("export", str(runs["elastic"]), "--subnet", json.dumps(SUBNET), "--out", str(adapters["elastic"]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = [{"base": str(tiny_llama_dir), "adapter": str(adapters[n]), "nf4": n.startswith("qlora"), "ids": IDS,
             "out": str(tmp / f"{n}.pt")} for n in runs]
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, str(STOCK), str(tmp / "jobs.json")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stock = {n: torch.load(tmp / f"{n}.pt") for n in runs}
    summaries = {n: json.loads((adapters[n] / "flexrank_export.json").read_text()) for n in runs}
    return runs, stock, summaries


@pytest.mark.parametrize("name", ["sora", "adalora", "qlora_sora"])
def test_learned_ranks_export_to_stock_peft_with_identical_logits(exported, name):
    runs, stock, summaries = exported
    full = 4 * 14  # r=4 on 7 linear modules x 2 layers
    if name == "adalora":
        assert summaries[name]["total_rank"] == 2 * 14  # target_r x modules
    else:
        assert 0 < summaries[name]["total_rank"] < full  # SoRA pruned some gates to exact zero, not all
    expected = _trained_logits(runs[name])
    assert not torch.allclose(expected, _base_logits(runs[name]), atol=1e-3)  # the adapter changes the logits
    torch.testing.assert_close(stock[name], expected, rtol=0, atol=1e-5)


def test_json_subnet_through_the_cli_exports_to_stock_peft(exported):
    runs, stock, summaries = exported
    # The recipe adapts q, k, v, up, down: q,k,v count three times per layer, up and down once.
    assert summaries["elastic"]["total_rank"] == 3 * (6 + 4) + (8 + 4) + (4 + 6)
    torch.testing.assert_close(stock["elastic"], _trained_logits(runs["elastic"], SUBNET), rtol=0, atol=1e-5)
    maximal = _trained_logits(runs["elastic"], "maximal")
    assert not torch.allclose(stock["elastic"], maximal, atol=1e-4)  # the subnet, not the whole supernet


def _base_logits(run_dir: Path) -> torch.Tensor:
    finished = load_run(run_dir)
    model = finished.model
    with torch.no_grad(), model.disable_adapter():
        return model.eval()(input_ids=torch.tensor(IDS)).logits


def test_all_pruned_run_is_a_clear_error_not_a_broken_adapter(tiny_llama_dir, tmp_path):
    # A threshold far above any gate: the first proximal step zeroes every gate.
    run = _train(tiny_llama_dir, tmp_path, "sora", "pruned", **{"adapter.sora.threshold": 10.0,
                                                                "adapter.sora.schedule.dense_steps": 0,
                                                                "training.max_steps": 2})
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["export"]["total_rank"] == 0 and "every rank was pruned" in metrics["export"]["error"]
    assert not (run / "adapter").exists()  # never a folder stock peft refuses
    assert (run / "ranks.csv").read_text().count(",0\n") == 14  # the rank report still says what happened
    proc = _flexrank("export", str(run), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    # (the last line: libraries may print import-time warnings before it)
    assert proc.stderr.strip().splitlines()[-1:] == [
        "flexrank: error: export: got '0 of 56 ranks active'; allowed: an adapter with at least one active rank "
        "(every rank was pruned, so the base model alone is this run's model and there is no adapter to write; "
        "train with a lower adapter.sora.threshold / sparse_lambda, a larger adapter.adalora.target_r, or export "
        "a larger subnet)"]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp*"))
