"""Held-out evaluation time: choice with 2 vs 5 labels, one process vs DDP vs ZeRO-3 (2 processes), and generation
under ZeRO-3 with the parameters gathered once vs left sharded.

    python bench/eval_time.py [--model smollm2|tiny|PATH] [--records 16] [--batch-size 8] [--max-length 128]
                              [--json OUT] [--update-readme]

Records: real news articles (gensim's lee_background.cor, hundreds of tokens each, as in bench/corpus.py), each
asked for one of 5 topics (assigned in turn: the labels' correctness does not change the time), cut to
--max-length with truncation middle, as a user's topic task would be.
- choice, 2 vs 5 labels: in this process, the same records, `choice_scores` timed after a warm-up batch.
- phases: `flexrank train` with lr 0 and one step, evaluating after training only (so that ZeRO-3 has partitioned
  the model), loss + exact_match + choice; the time is the phase's own (metrics.json after.seconds, and
  after.timings per part), not start-up. Sides: 1 process, DDP, ZeRO-3 (eval.gather_parameters auto: gathered
  once), ZeRO-3 with gather_parameters false (sharded: a gather per layer per forward, generation in lockstep).
Every side's metrics must be equal (checked). One torch thread per process: 2 processes use 2 cores. Needs 2
free cores for a fair number; on a shared machine the ratios are inflated.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
TOPICS = ["politics", "business", "sport", "science", "culture"]
QUESTION = "Which topic is this article about? Answer with one word."
SIDES = [("one process", "single", "auto"), ("DDP", "ddp", "auto"), ("ZeRO-3, gathered once", "zero3", "auto"),
         ("ZeRO-3, sharded", "zero3", "false")]
EQUAL = ("loss", "exact_match", "choice")


def _model(name: str) -> str:
    if name == "smollm2":
        from flexrank.models.assets import smollm2_dir

        return str(smollm2_dir())
    if name == "tiny":
        from flexrank.io import cache_dir

        path = cache_dir("test-models") / "tiny-llama"
        if not (path / "config.json").exists():
            sys.exit("the tiny test model is made by the test suite (tests/conftest.py); run a test once first")
        return str(path)
    return name


def _records(n: int) -> list[dict]:
    sys.path.insert(0, str(HERE))
    from corpus import news_articles

    return [{"instruction": QUESTION, "input": text, "output": TOPICS[i % len(TOPICS)]}
            for i, text in enumerate(news_articles()[:n])]


def choice_labels(model_path: str, records: list[dict], batch_size: int, max_length: int) -> dict:
    """Seconds of choice scoring with the first 2 labels and with all 5, on the same records, in this process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flexrank.evaluation.scoring import Limits, choice_scores

    torch.set_num_threads(1)
    tok, model = AutoTokenizer.from_pretrained(model_path), AutoModelForCausalLM.from_pretrained(model_path).eval()
    limits = Limits(max_length, "middle", 8)
    choice_scores(model, tok, records[:2], TOPICS, batch_size, limits=limits)  # warm-up
    seconds = {}
    for k in (2, 5):
        start = time.perf_counter()
        choice_scores(model, tok, records, TOPICS[:k], batch_size, limits=limits)
        seconds[k] = round(time.perf_counter() - start, 2)
    return seconds


def _recipe(tmp: Path, model: str, records: list[dict], batch_size: int, max_length: int) -> Path:
    (tmp / "articles.json").write_text(json.dumps(records))
    (tmp / "train.json").write_text(json.dumps(records[:4]))
    raw = {"model": {"name_or_path": model},
           "data": {"path": str(tmp / "train.json"), "eval_path": str(tmp / "articles.json"),
                    "max_length": max_length, "truncation": "middle"},
           "adapter": {"method": "lora", "r": 4},
           "eval": {"before": False, "after": True, "batch_size": batch_size, "max_new_tokens": 4,
                    "metrics": ["loss", "exact_match", "choice"], "choices": TOPICS},
           "training": {"learning_rate": 0.0, "per_device_train_batch_size": 1, "max_steps": 1, "report_to": [],
                        "seed": 0}}
    path = tmp / "eval_time.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def phase(recipe: Path, out: Path, backend: str, gather: str) -> dict:
    """The after-training evaluation phase of one `flexrank train` run (metrics.json after)."""
    from flexrank.launcher.launch import free_port

    args = [sys.executable, "-m", "flexrank", "train", str(recipe), "--set", f"training.output_dir={out}",
            "--set", f"eval.gather_parameters={gather}"]
    if backend != "single":
        args += ["--nproc", "2", "--backend", backend, "--main-process-port", str(free_port())]
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        sys.exit(f"{backend} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads((out / "metrics.json").read_text())["after"]


def table(choice: dict, runs: dict) -> tuple[str, dict]:
    one, ddp, z3, z3s = (runs[name] for name, _, _ in SIDES)
    rows = [
        ("choice: 5 labels vs 2 (same records, one process)", f"{choice[5]:.1f}", f"{choice[2]:.1f}",
         choice[5] / choice[2], "<= 1.6x"),
        ("evaluation phase: DDP (2 processes) vs one process", f"{ddp['seconds']:.1f}", f"{one['seconds']:.1f}",
         ddp["seconds"] / one["seconds"], "<= 0.6x"),
        ("evaluation phase: ZeRO-3 gathered once vs DDP", f"{z3['seconds']:.1f}", f"{ddp['seconds']:.1f}",
         z3["seconds"] / ddp["seconds"], "<= 1.5x"),
        ("evaluation phase: ZeRO-3 gathered once vs sharded", f"{z3['seconds']:.1f}", f"{z3s['seconds']:.1f}",
         z3["seconds"] / z3s["seconds"], ""),
        ("generation (exact_match) under ZeRO-3: gathered once vs sharded",
         f"{z3['timings']['generation']:.1f}", f"{z3s['timings']['generation']:.1f}",
         z3["timings"]["generation"] / z3s["timings"]["generation"], ""),
    ]
    lines = ["| comparison | A s | B s | A / B | target | met |", "|---|---|---|---|---|---|"]
    met = {}
    for name, sa, sb, ratio, target in rows:
        ok = "" if not target else ("yes" if ratio <= float(target[3:-1]) else "**no**")
        met[name] = {"ratio": round(ratio, 3), "met": ok}
        lines.append(f"| {name} | {sa} | {sb} | {ratio:.2f}x | {target} | {ok} |")
    parts = ["| side | phase s | loss s | choice s | generation s |", "|---|---|---|---|---|"]
    parts += [f"| {name} | {r['seconds']:.1f} | {r['timings']['loss']:.1f} | {r['timings']['choice']:.1f} | "
              f"{r['timings']['generation']:.1f} |" for name, r in runs.items()]
    return "\n".join(lines) + "\n\nParts of each evaluation phase:\n\n" + "\n".join(parts), met


def update_readme(text: str) -> None:
    readme = HERE / "README.md"
    start, end = "<!-- eval-table:start -->", "<!-- eval-table:end -->"
    body = readme.read_text()
    if start not in body:
        body = body.rstrip() + f"\n\n## Evaluation time (bench/eval_time.py)\n\n{start}\n{end}\n"
    head, rest = body.split(start, 1)
    readme.write_text(head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="smollm2 (bundled), tiny (the tests' random model) or a path")
    p.add_argument("--records", type=int, default=16, help="held-out records (news articles)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128, help="data.max_length (articles are cut to it)")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--update-readme", action="store_true", help="put the table in bench/README.md")
    a = p.parse_args(argv)
    started, load_before = time.perf_counter(), "/".join(f"{x:.1f}" for x in os.getloadavg())
    model, records = _model(a.model), _records(a.records)
    choice = choice_labels(model, records, a.batch_size, a.max_length)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = _recipe(Path(tmp), model, records, a.batch_size, a.max_length)
        runs = {name: phase(recipe, Path(tmp) / f"{backend}-{gather}", backend, gather)
                for name, backend, gather in SIDES}
    same = all(r[k] == runs["one process"][k] for r in runs.values() for k in EQUAL)
    body, met = table(choice, runs)
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())  # other jobs on the cores inflate every time
    header = (f"`python bench/eval_time.py --model {a.model} --records {a.records} --batch-size {a.batch_size} "
              f"--max-length {a.max_length}` on {datetime.now():%Y-%m-%d %H:%M}, CPU ({os.cpu_count()} cores, load "
              f"average {load_before} at the start, {load} at the end), one torch thread per process, "
              f"{runs['one process']['truncated']} of {a.records} prompts truncated; metrics of all 4 sides "
              f"{'identical' if same else 'DIFFER'}; {time.perf_counter() - started:.0f} s in all. "
              "A / B: A's time over B's.")
    text = header + "\n\n" + body
    print(text)
    result = {"args": vars(a), "choice_seconds": choice, "phases": runs, "same_metrics": same, "comparisons": met}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    if a.update_readme:
        update_readme(text)
    return result


if __name__ == "__main__":
    main()
