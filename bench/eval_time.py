"""Held-out evaluation time on 1 process vs 2 processes (DDP, sharded evaluation) on the same data.

    python bench/eval_time.py [--model smollm2|tiny|PATH] [--records 64] [--batch-size 8] [--json OUT]

Each side runs `flexrank train` with lr 0 and one step, evaluating before training only; the time is the
evaluation phase's own (metrics.json before.seconds: loss, exact_match and choice), not start-up. Prints both
times and the ratio (target <= 0.6). Needs 2 free cores for a fair number; on a shared machine the ratio is
inflated. The metrics of both sides must be equal (sharding does not change the numbers): checked too.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

LABELS = ["sports", "business", "technology", "politics"]


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


def _recipe(tmp: Path, model: str, records: int, batch_size: int) -> Path:
    data = [{"instruction": "Which topic is this headline about?",
             "input": f"Headline {i}: news from the {LABELS[i % 4]} desk, item {i * 7 % 13}", "output": LABELS[i % 4]}
            for i in range(records * 5)]  # a fifth is held out
    (tmp / "topics.json").write_text(json.dumps(data))
    raw = {"model": {"name_or_path": model},
           "data": {"path": str(tmp / "topics.json"), "eval_size": records},
           "adapter": {"method": "lora", "r": 4},
           "eval": {"before": True, "after": False, "batch_size": batch_size, "max_new_tokens": 4,
                    "metrics": ["loss", "exact_match", "choice"]},
           "training": {"learning_rate": 0.0, "per_device_train_batch_size": 1, "max_steps": 1, "report_to": [],
                        "seed": 0}}
    path = tmp / "eval_time.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(recipe: Path, out: Path, nproc: int) -> dict:
    from flexrank.launcher.launch import free_port

    args = [sys.executable, "-m", "flexrank", "train", str(recipe), "--set", f"training.output_dir={out}"]
    if nproc > 1:
        args += ["--nproc", str(nproc), "--backend", "ddp", "--main-process-port", str(free_port())]
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        sys.exit(f"{nproc} process(es) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads((out / "metrics.json").read_text())["before"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="smollm2 (bundled), tiny (the tests' random model) or a path")
    p.add_argument("--records", type=int, default=64, help="held-out records")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", help="also write the result here")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = _recipe(Path(tmp), _model(a.model), a.records, a.batch_size)
        one, two = _run(recipe, Path(tmp) / "one", 1), _run(recipe, Path(tmp) / "two", 2)
    same = all(one[k] == two[k] for k in ("loss", "exact_match", "choice"))
    result = {"model": a.model, "records": a.records, "batch_size": a.batch_size, "one_process_s": one["seconds"],
              "two_processes_s": two["seconds"], "ratio": round(two["seconds"] / one["seconds"], 3),
              "same_metrics": same, "metrics": {k: one[k] for k in ("loss", "exact_match", "choice")}}
    print(json.dumps(result))
    print(f"[eval_time] {a.records} records, batch {a.batch_size}: 1 process {one['seconds']:.1f} s, "
          f"2 processes (DDP) {two['seconds']:.1f} s, ratio {result['ratio']:.2f} (target <= 0.6); "
          f"metrics {'identical' if same else 'DIFFER'}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
