"""How much of the maximal subnet's quality the smaller subnets keep: the same base-width supernet
(recipes/analogy_elastic_base_widths.yaml: per-layer MLP widths 1536 -> 768 with the adapter ranks) trained three ways
for the same steps — first-channel widths (LoNAS), importance-ordered widths, importance-ordered + in-place
distillation — then searched (NSGA-II) and the chosen subnet exported as a compact model; and plain LoRA on the same
modules with the same steps, for reference.

    python bench/subnet_quality.py [--steps 60] [--ways first,importance,distill,lora] [--out DIR]
                                   [--json OUT] [--update-readme]

Per way, one table row each for the maximal, heuristic and searched subnet: parameters and MACs per token (the
run's cost model: base + active adapter), exact match on the 200 held-out analogy questions, and that as a
fraction of the maximal's. The search scores subnets on questions 0-99 (`search.eval_size`) with NNCF's rule
(`ref_acc` the maximal's, `acc_delta` 5% of it: the smallest subnet within 5% of the maximal on those questions);
the searched row is its compact export (`flexrank export --compact`: the base sliced to the subnet's widths, the
adapter merged) loaded with stock transformers and scored on all 200 questions by flexrank's evaluation code (the
same as a run's), so a compact model that did not reproduce its subnet would show here.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPE = "analogy_elastic_base_widths"
ORDERED = ["adapter.elastic.importance=activation"]
WAYS = {
    "first": ("first channels (LoNAS)", []),
    "importance": ("importance-ordered", ORDERED),
    "distill": ("importance-ordered + distillation", ORDERED + ["adapter.elastic.distill={weight: 0.5}"]),
    "lora": ("plain LoRA (same modules, r=16)", ["adapter.method=lora", "adapter.elastic=null"]),
}
SEARCH = {"eval_size": 100, "population": 8, "num_evals": 32, "test_size": 0}
README_START, README_END = "<!-- subnet-quality:start -->", "<!-- subnet-quality:end -->"


def flexrank(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "flexrank", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    if proc.returncode:
        sys.exit(f"flexrank {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def _sets(pairs: list[str]) -> list[str]:
    return [a for s in pairs for a in ("--set", s)]


def train(recipe: str, out: Path, steps: int, sets: list[str]) -> dict:
    flexrank("train", recipe, *_sets([f"training.output_dir={out}", f"training.max_steps={steps}", "eval.before=false",
                                     *sets]))
    return json.loads((out / "metrics.json").read_text())


def search(run: Path, maximal: float, overrides: list[str]) -> dict:
    """NSGA-II over the run's subnets; NNCF's rule picks the smallest within 5% of the maximal."""
    settings = {**SEARCH, "ref_acc": -1, "acc_delta": round(0.05 * maximal, 4)}
    flexrank("search", str(run), *_sets([f"search.{k}={v}" for k, v in settings.items()] + overrides))
    return json.loads((run / "search" / "search_best.json").read_text())


def compact_metrics(run: Path, subnet: Path, out: Path) -> tuple[dict, dict]:
    """(the chosen subnet's compact export loaded with stock transformers, the same subnet in the supernet): exact
    match and loss on the run's held-out questions, both scored by flexrank's evaluation code."""
    flexrank("export", str(run), "--subnet", str(subnet), "--compact", str(out))
    from transformers import AutoModelForCausalLM

    from flexrank.adapters.registry import load_run
    from flexrank.data import records as data_lib
    from flexrank.data.pipeline import load_data, tokenize
    from flexrank.evaluation.metrics import evaluate_run

    finished = load_run(run)
    data = load_data(finished.cfg)
    eval_set = tokenize(finished.cfg, finished.tokenizer, data.eval, data.kind)

    def scores(model) -> dict:
        result = evaluate_run(finished.cfg, model.eval(), finished.tokenizer, data, eval_set,
                              data_lib.make_collator(finished.tokenizer, False))
        return {k: result[k] for k in ("exact_match", "loss")}

    finished.method.activate(json.loads(subnet.read_text())["config"])
    return scores(AutoModelForCausalLM.from_pretrained(out)), scores(finished.model)


def measure_way(way: str, a) -> dict:
    label, sets = WAYS[way]
    start = time.perf_counter()
    run = a.out / way
    m = train(a.recipe, run, a.steps, a.set + sets)  # the way's own keys last (LoRA drops the elastic section)
    rows = {}
    if way == "lora":
        total = m["parameters"]["total"]
        rows["maximal"] = {"params": total, "macs": total, "exact_match": m["after"]["exact_match"]}
    else:
        for which in ("maximal", "heuristic"):
            rows[which] = {**{k: m["size"][which][k] for k in ("params", "macs")},
                           "exact_match": m["subnets"][which]["exact_match"]}
        best = search(run, rows["maximal"]["exact_match"], a.search_set)
        compact, supernet = compact_metrics(run, run / "search" / "search_best.json", a.out / f"{way}-compact")
        rows["searched"] = {"params": best["params"], "macs": best["macs"], "search_metric": best["metric"],
                            "config": best["config"], **compact, "in_supernet": supernet}
    return {"label": label, "rows": rows, "seconds": round(time.perf_counter() - start, 1)}


def table(results: dict, steps: int) -> str:
    lines = [f"Trained {steps} steps each (batch 16); exact match on the 200 held-out analogy questions; parameters "
             "per token of the subnet (base + active adapter; MACs are the same number for these linear layers).", "",
             "| way | subnet | params (M) | of maximal | exact match | of maximal's | minutes |",
             "|---|---|---|---|---|---|---|"]
    # searched: the compact export (stock transformers); the same subnet in the supernet is in the JSON (in_supernet)
    for r in results.values():
        top = r["rows"]["maximal"]
        for i, (which, row) in enumerate(r["rows"].items()):
            label, minutes = (r["label"], f"{r['seconds'] / 60:.1f}") if i == 0 else ("", "")
            kept = row["exact_match"] / top["exact_match"] if top["exact_match"] else 0.0
            lines.append(f"| {label} | {which} | {row['params'] / 1e6:.1f} | {row['params'] / top['params']:.0%} | "
                         f"{row['exact_match']:.3f} | {kept:.0%} | {minutes} |")
    return "\n".join(lines)


def update_readme(text: str) -> None:
    readme = HERE.parent / "README.md"
    body = readme.read_text()
    start, end = body.index(README_START) + len(README_START), body.index(README_END)
    stamp = f"\n<!-- bench/subnet_quality.py, {datetime.now():%Y-%m-%d} -->\n"
    readme.write_text(body[:start] + stamp + text + "\n" + body[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per way (the recipe's: 60)")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated, of {', '.join(WAYS)}")
    parser.add_argument("--out", type=Path, default=Path("runs/subnet_quality"))
    parser.add_argument("--recipe", default=RECIPE, help="the base-width supernet recipe (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override, every way")
    parser.add_argument("--search-set", action="append", default=[], metavar="search.KEY=VALUE",
                        help=f"search setting override (defaults: {SEARCH})")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--update-readme", action="store_true")
    a = parser.parse_args()
    ways = a.ways.split(",")
    if unknown := [w for w in ways if w not in WAYS]:
        parser.error(f"--ways: unknown {unknown}; allowed: {list(WAYS)}")
    results = {}
    for way in ways:
        results[way] = measure_way(way, a)
        print(json.dumps({way: results[way]}), flush=True)
    text = table(results, a.steps)
    print(text)
    if a.json:
        a.json.write_text(json.dumps({"steps": a.steps, "recipe": a.recipe, "set": a.set, "results": results}, indent=1))
    if a.update_readme:
        update_readme(text)


if __name__ == "__main__":
    main()
