"""Subnet search over an elastic supernet: cost counting, NSGA-II, the best-subnet rule, and `flexrank search` on a
tiny trained run (cache resume, 2 processes, outputs, export of the chosen subnet, bad input)."""

import csv
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from conftest import tiny_llama_config
from dist_helpers import recipe, run, train_args
from flexrank.elastic.cost import CostModel, LinearShape, SubnetShape
from flexrank.elastic.nsga import NSGASettings, nsga2, pareto_front
from flexrank.elastic.results import Row, select_best
from flexrank.elastic.search import nls_candidates
from flexrank.adapters.rank_layer import register_rank_layer
from flexrank.elastic.search_space import space_from_spec

L0, L1 = "base_model.model.model.layers.0", "base_model.model.model.layers.1"


def test_cost_counts_linear_layers_and_active_ranks_of_a_tiny_llama():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config())  # hidden 64, MLP 128, 2 layers, 4 heads of 16, 2 KV heads
    cfg = register_rank_layer(LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]))
    costs = CostModel.of(get_peft_model(model, cfg))
    # Per layer: q 64x64, k 64x32, v 64x32, o 64x64, gate 64x128, up 64x128, down 128x64; head 64x1000.
    per_layer = 4096 + 2048 + 2048 + 4096 + 8192 + 8192 + 8192
    base = 2 * per_layer + 64 * 1000
    ranks = {f"{L0}.self_attn.{m}": 8 for m in ("q_proj", "k_proj", "v_proj")}
    ranks |= {f"{L0}.mlp.up_proj": 6, f"{L0}.mlp.down_proj": 4}
    ranks |= {f"{L1}.self_attn.{m}": 4 for m in ("q_proj", "k_proj", "v_proj")}
    ranks |= {f"{L1}.mlp.up_proj": 4, f"{L1}.mlp.down_proj": 4}
    # rank x (in + out): q 64+64, k/v 64+32, up 64+128, down 128+64
    adapter = 8 * (128 + 96 + 96) + 6 * 192 + 4 * 192 + 4 * (128 + 96 + 96) + 4 * 192 + 4 * 192
    cost = costs.cost(SubnetShape(ranks))
    assert (cost.base_params, cost.base_macs, cost.adapter_params) == (base, base, adapter)
    assert (cost.params, cost.macs) == (base + adapter, base + adapter)
    # An elastic base width (issue 14's MLP cut) changes the module's base weights and its adapter's A/B sizes.
    narrow = costs.cost(SubnetShape(ranks, base={f"{L0}.mlp.up_proj": LinearShape(64, 96)}))
    assert narrow.base_params == base - 64 * 32
    assert narrow.adapter_params == adapter - 6 * 192 + 6 * (64 + 96)
    with pytest.raises(KeyError):
        costs.cost(SubnetShape({"no.such.module": 4}))


WIDTHS, WEIGHTS = (8, 6, 4), (3.0, 2.0, 1.5, 1.0)


def _synthetic(x):
    """Cost = total width; metric saturates with width, more in the heavier groups."""
    widths = [WIDTHS[i] for i in x]
    return float(sum(widths)), sum(w * (1 - 2 ** (-v / 4)) for w, v in zip(WEIGHTS, widths))


def test_nsga2_finds_the_pareto_front_of_a_synthetic_objective_and_is_deterministic():
    everything = [_synthetic(x) for x in itertools.product(range(3), repeat=4)]
    truth = sorted({everything[i] for i in pareto_front(everything)})  # brute force over all 81 configurations
    assert len(truth) == 9

    def evaluate(xs):
        return [_synthetic(x) for x in xs]

    settings = NSGASettings(num_evals=160, population=16, seed=3)
    records = nsga2([3] * 4, evaluate, settings)
    found = [(c, m) for _, _, c, m in records]
    assert sorted({found[i] for i in pareto_front(found)}) == truth
    assert len({x for _, x, _, _ in records}) < 81  # it searched, it did not enumerate
    assert [g for g, *_ in records][-1] == settings.generations - 1
    assert nsga2([3] * 4, evaluate, settings) == records
    assert nsga2([3] * 4, evaluate, NSGASettings(num_evals=160, population=16, seed=4)) != records


def _row(macs, metric, source="nsga2"):
    return Row(0, source, {"g": macs}, metric, {"macs": macs, "params": macs})


def test_best_subnet_is_the_lowest_cost_within_acc_delta_of_ref_acc_as_in_nncf():
    rows = [_row(100, 0.60), _row(80, 0.585), _row(60, 0.589), _row(50, 0.57), _row(40, 0.30)]
    best = select_best(rows, ref=0.60, delta=0.02)  # threshold 0.58: 100, 80 and 60 qualify
    assert best.qualified and best.row.cost["macs"] == 60 and best.threshold == pytest.approx(0.58)
    none = select_best(rows, ref=0.70, delta=0.01)  # nothing reaches 0.69: said so, best metric taken
    assert not none.qualified and none.row.cost["macs"] == 100 and "no subnet" in none.note
    loss = select_best([_row(100, 1.0), _row(70, 1.04), _row(50, 1.2)], ref=1.0, delta=0.05, higher_is_better=False)
    assert loss.row.cost["macs"] == 70


def test_nls_candidates_are_the_most_trained_widths_and_the_lowest_mean_losses():
    modules = [f"layers.{i}.{m}" for i in range(2) for m in ("q_proj", "up_proj")]
    space = space_from_spec({"groups": [["q_proj"], ["up_proj"]], "widths": [8, 6, 4]}, modules, max_rank=8)
    steps = list(range(40))
    trained = {s: space.config_for_step(0, s, 100) for s in steps}
    losses = {s: float((s * 7) % 11) for s in steps}
    got = nls_candidates(space, 0, 100, steps, losses)
    for group in space.groups:  # most often trained width per group, counted here by hand
        counts = {w: sum(c[group.name] == w for c in trained.values()) for w in group.widths}
        assert got["nls_frequent"][group.name] == max(group.widths, key=lambda w: (counts[w], w))
    means = {}
    for s, c in trained.items():
        means.setdefault(json.dumps(c), []).append(losses[s])
    lowest = sorted(means, key=lambda k: (sum(means[k]) / len(means[k]), k))[:5]
    assert [got[f"nls_loss_{i}"] for i in range(1, 6)] == [json.loads(k) for k in lowest]


# --- `flexrank search` on a tiny trained elastic run -----------------------------------------------------------

SEARCH = ["--set", "search.metric=loss", "--set", "search.num_evals=8", "--set", "search.population=4",
          "--set", "search.eval_size=4", "--set", "search.seed=1"]


@pytest.fixture(scope="module")
def elastic_run(tmp_path_factory, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("search")
    out = tmp / "run"
    run(train_args(recipe(tmp, tiny_llama_dir, "elastic", max_steps=8), out, "single", match_two_processes=False))
    return out


def _copy(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns("search"))
    return to


def _flexrank(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "flexrank", *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    if check:
        assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "search" / "search_progression.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def searched(elastic_run):
    _flexrank("search", elastic_run, *SEARCH)
    return elastic_run


def test_the_elastic_controller_records_each_steps_training_loss(elastic_run):
    import torch

    state = torch.load(elastic_run / "supernet" / "flexrank_controller.pt", weights_only=False)
    logged = json.loads((elastic_run / "metrics.json").read_text())["train"]["losses"]  # logging_steps: 1
    assert sorted(state["losses"]) == list(range(8))
    assert [state["losses"][s] for s in range(8)] == pytest.approx(logged, abs=1e-3)


def test_search_writes_its_outputs_and_the_chosen_subnet_exports(searched, tmp_path):
    rows = _rows(searched)
    baselines = [r["source"] for r in rows if r["generation"] == "baseline"]
    assert baselines[:3] == ["maximal", "heuristic", "minimal"] and "nls_frequent" in baselines
    assert "nls_loss_1" in baselines  # the run recorded per-step training losses
    assert [r["generation"] for r in rows if r["source"] == "nsga2"] == ["0"] * 4 + ["1"] * 4
    assert (searched / "search" / "search_progression.png").read_bytes()[:4] == b"\x89PNG"
    best = json.loads((searched / "search" / "search_best.json").read_text())
    metrics = [float(r["metric"]) for r in rows]
    maximal = metrics[0]  # ref_acc unset: the maximal subnet's loss + acc_delta is the bar
    ok = [r for r in rows if float(r["metric"]) <= maximal + 0.01]
    assert best["macs"] == min(int(r["macs"]) for r in ok) and best["metric_name"] == "loss"
    assert best["ref_acc"] == maximal
    out = tmp_path / "adapter"
    _flexrank("export", searched, "--subnet", searched / "search" / "search_best.json", "--out", out)
    tensors = load_file(out / "adapter_model.safetensors")
    for module, group in (("layers.0.self_attn.q_proj", "L0:q_proj+k_proj+v_proj"), ("layers.1.mlp.down_proj",
                                                                                       "L1:down_proj")):
        a = next(k for k in tensors if f"{module}.lora_A" in k)
        assert tensors[a].shape[0] == best["config"][group]  # the plain adapter has the chosen rank


def test_an_interrupted_search_resumes_from_the_cache_without_re_evaluating(searched, tmp_path, monkeypatch):
    from flexrank.elastic import search as search_mod

    run_dir = _copy(searched, tmp_path / "run")
    calls = []
    original = search_mod.SubnetScorer.__call__

    def counting(self, config):
        calls.append(json.dumps(config))
        if limit is not None and len(calls) > limit:
            raise KeyboardInterrupt  # as if the job were killed mid-search
        return original(self, config)

    monkeypatch.setattr(search_mod.SubnetScorer, "__call__", counting)
    overrides = SEARCH[1::2]
    limit = 10
    with pytest.raises(KeyboardInterrupt):
        search_mod.search(run_dir, overrides)
    done = calls[:limit]  # the 11th evaluation was interrupted
    calls.clear()
    limit = None
    search_mod.search(run_dir, overrides)
    assert not set(calls) & set(done)  # nothing evaluated twice
    assert len(done) + len(calls) == len({r["config"] for r in _rows(searched)})
    assert _rows(run_dir) == _rows(searched)  # the same search as the uninterrupted one


def test_two_processes_split_the_subnets_and_write_the_same_csv(searched, tmp_path):
    run_dir = _copy(searched, tmp_path / "run")
    proc = _flexrank("search", run_dir, *SEARCH, "--nproc", "2")
    assert "accelerate.commands.launch" in proc.stdout
    assert _rows(run_dir) == _rows(searched)
    cache = next((run_dir / "search" / "cache").glob("[!t]*.jsonl")).read_text().splitlines()
    assert len(cache) == len({r["config"] for r in _rows(searched)})  # each subnet evaluated once, by one process


def test_bad_input_is_refused_with_one_line(searched, tmp_path, capsys):
    from flexrank.launcher.cli import main

    lora = tmp_path / "lora"
    lora.mkdir()
    cfg = yaml.safe_load((searched / "config.yaml").read_text())
    cfg["adapter"] = {"method": "lora", "r": 4}
    (lora / "config.yaml").write_text(yaml.safe_dump(cfg))
    cases = [([searched, "--set", "search.ref_acc=1.5"], "search.ref_acc"),
             ([searched, "--set", "search.metric=loss", "--set", "search.ref_acc=-0.5"], "search.ref_acc"),
             ([searched, "--set", "adapter.r=4"], "--set"),
             ([searched, "--set", "search.num_evals=2", "--set", "search.population=4"], "search.num_evals"),
             ([lora], "an elastic run"),
             ([tmp_path / "missing"], "a finished flexrank run")]
    for args, expected in cases:
        assert main(["search", *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err


def test_the_search_metric_is_any_metric_the_run_reports():
    from flexrank.errors import ConfigError
    from flexrank.evaluation.metrics import metric_to_score

    assert metric_to_score("auto", ["loss", "exact_match"]) == (["exact_match"], "exact_match")
    assert metric_to_score("auto", ["loss", "choice"]) == (["choice"], "choice")
    assert metric_to_score("auto", ["loss"]) == (["loss"], "loss")
    assert metric_to_score("auto", ["loss", "my.mod:bleu"]) == (["my.mod:bleu"], "bleu")
    assert metric_to_score("perplexity", ["loss", "choice"]) == (["loss"], "perplexity")
    assert metric_to_score("my.mod:bleu", ["loss", "my.mod:bleu"]) == (["my.mod:bleu"], "bleu")
    assert metric_to_score("rouge_l", ["my.mod:rouge"]) == (["my.mod:rouge"], "rouge_l")  # a key of its dict
    with pytest.raises(ConfigError, match=r"search.metric: got 'choice'; allowed: auto or a metric the run reports: "
                                          r"\['exact_match', 'loss', 'perplexity'\]"):
        metric_to_score("choice", ["loss", "exact_match"])


def test_search_on_choice_scores_subnets_as_flexrank_eval_does(elastic_run, tmp_path):
    """A run whose eval.metrics has choice is searched on it (search.metric: choice): the maximal subnet's score
    in the search equals its choice accuracy from the run's own evaluation (as `flexrank eval` computes it) on the
    same records."""
    from flexrank.adapters.registry import load_run
    from flexrank.config import load_config
    from flexrank.data import records as data_lib
    from flexrank.data.pipeline import load_data, tokenize
    from flexrank.data.records import reference_answer
    from flexrank.elastic import search as search_mod
    from flexrank.evaluation.metrics import evaluate_run

    run_dir = _copy(elastic_run, tmp_path / "run")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    held_out = load_data(load_config(run_dir / "config.yaml")).eval
    labels = sorted({reference_answer(r) for r in held_out})
    cfg["eval"].update({"metrics": ["choice", "loss"], "choices": labels})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    best = search_mod.search(run_dir, ["search.metric=choice", "search.num_evals=4", "search.population=4",
                                       "search.seed=1"])
    assert best["metric_name"] == "choice" and best["eval_records"] == [0, len(held_out)]
    maximal = next(r for r in _rows(run_dir) if r["source"] == "maximal")
    run = load_run(run_dir)
    run.method.activate("maximal")
    data = load_data(run.cfg)
    evaluated = evaluate_run(run.cfg, run.model, run.tokenizer, data, tokenize(run.cfg, run.tokenizer, data.eval,
                                                                                data.kind),
                             data_lib.make_collator(run.tokenizer, False))
    assert float(maximal["metric"]) == pytest.approx(evaluated["choice"])
    assert len(labels) > 1 and evaluated["choice_labels"] == len(labels)
    assert json.loads((run_dir / "search" / "search_best.json").read_text())["config"] == best["config"]


TOPIC_SENTENCES = {
    "sport": ["The striker scored twice in the final", "The team won the league after a late goal",
              "The runner broke the record at the stadium", "Fans cheered as the match went to penalties"],
    "business": ["Shares fell after the company cut its profit forecast", "The bank raised interest rates again",
                 "The firm reported higher quarterly sales", "Investors sold bonds as inflation rose"],
    "science": ["Researchers measured the speed of the particles", "The telescope found a new planet",
                "Chemists made a stronger battery material", "The study tracked cells under the microscope"],
}


def test_search_on_choice_of_a_topic_file_runs_and_exports_its_best_subnet(tiny_llama_dir, tmp_path):
    """A user's topic-classification file (instruction/input/output records, eval.metrics [choice] with the topics
    as choices): the search scores subnets by choice accuracy, and its best subnet exports as a plain adapter that
    stock peft loads with the supernet's logits for that subnet."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from flexrank.adapters.registry import load_run
    from flexrank.config import load_config
    from flexrank.elastic import search as search_mod
    from flexrank.run import train

    records = [{"instruction": "Which topic is this sentence about? Answer with one word.", "input": text,
                "output": topic} for topic, texts in TOPIC_SENTENCES.items() for text in texts]
    (tmp_path / "train.json").write_text(json.dumps(records * 4))
    (tmp_path / "held_out.json").write_text(json.dumps(records))
    run_dir = tmp_path / "run"
    topics = sorted(TOPIC_SENTENCES)
    train(load_config(recipe(tmp_path, tiny_llama_dir, "elastic", max_steps=4), [
        f"training.output_dir={run_dir}", "data.task=null", f"data.path={tmp_path / 'train.json'}",
        f"data.eval_path={tmp_path / 'held_out.json'}", "eval.after=true", "eval.metrics=[choice]",
        f"eval.choices={json.dumps(topics)}", "adapter.elastic.evaluate_subnets=[maximal]",
        "adapter.elastic.export_subnet=maximal"]))
    best = search_mod.search(run_dir, ["search.metric=auto", "search.num_evals=4", "search.population=4",
                                       "search.seed=1", "search.acc_delta=1", "search.test_size=4"])
    assert best["metric_name"] == "choice" and best["eval_records"] == [0, len(records) - 4]
    assert best["test"]["records"] == 4 and set(best["test"]) == {"chosen", "heuristic", "maximal", "records"}
    assert best["test"]["chosen"]["macs"] == best["macs"]  # the chosen subnet re-scored on the 4 unseen records
    rows = _rows(run_dir)
    maximal = next(r for r in rows if r["source"] == "maximal")
    # The search's 8 records and the test's 4 are the run's 12 held-out records, scored as the run scored them.
    searched, tested = float(maximal["metric"]), best["test"]["maximal"]["choice"]
    run_metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (8 * searched + 4 * tested) / 12 == pytest.approx(run_metrics["subnets"]["maximal"]["choice"])
    assert best["macs"] == min(int(r["macs"]) for r in rows)  # acc_delta 1: every subnet qualifies, the smallest wins
    out = tmp_path / "adapter"
    _flexrank("export", run_dir, "--subnet", run_dir / "search" / "search_best.json", "--out", out)
    finished = load_run(run_dir)
    finished.method.activate(best["config"])
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, finished.model.eval()(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)
