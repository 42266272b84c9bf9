"""Four INT4 fine-tuning paths on the bundled SmolLM2 analogies, same data, steps, batch and seed:
INT4 QAT + NLS (nncf FQ_LORA_NLS, heuristic subnet), INT4 QAT + LoRA (FQ_LORA), bitsandbytes NF4 QLoRA, and
float LoRA + post-training INT4 (nncf compress_weights). Prints a Markdown table (held-out exact match and loss,
model size on disk, train time) and writes it with the raw numbers to OUT/nncf_compare.{md,json}.

    python bench/nncf_compare.py --out runs/nncf_compare [--steps 12 --batch 8 --eval-size 48]

`--only I` trains path I alone (0-3; run several at once on a machine with cores to spare); `--reuse` takes the
numbers of runs already finished under OUT instead of training them again.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INT4 = "{method: %s, mode: int4_asym, group_size: 64, backup: none}"
PATHS = {  # name -> (recipe, extra --set overrides)
    "INT4 QAT + NLS (heuristic, ranks 16/12/8)": ("analogy_nncf_int4_nls.yaml",
                                                  ["adapter.elastic.evaluate_subnets=[heuristic]"]),
    "INT4 QAT + LoRA (r 16)": ("analogy_lora.yaml", [f"model.quantization={INT4 % 'nncf_int4'}", "adapter.r=16"]),
    "bitsandbytes NF4 QLoRA (r 8)": ("analogy_qlora.yaml", []),
    "LoRA (r 8) + post-training INT4": ("analogy_lora.yaml", [f"model.quantization={INT4 % 'nncf_int4_ptq'}"]),
}


def train(recipe: str, out: Path, overrides: list[str], args) -> dict:
    common = [f"training.output_dir={out}", f"training.max_steps={args.steps}", "training.warmup_steps=2",
              f"training.per_device_train_batch_size={args.batch}", f"training.seed={args.seed}",
              f"data.eval_size={args.eval_size}", "eval.before=false", "eval.after=true"]
    cmd = [sys.executable, "-m", "flexrank", "train", str(ROOT / "recipes" / recipe)]
    for item in common + overrides:
        cmd += ["--set", item]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads((out / "metrics.json").read_text())


def qlora_bytes(out: Path) -> int:
    """The QLoRA model on disk: the NF4 base as transformers saves it, plus the adapter."""
    from flexrank.config import load_config
    from flexrank.models.loading import load_base_model, load_tokenizer

    cfg = load_config(out / "config.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        load_base_model(cfg.model, load_tokenizer(cfg.model)).save_pretrained(tmp)
        base = sum(f.stat().st_size for f in Path(tmp).rglob("*.safetensors"))
    return base + (out / "adapter" / "adapter_model.safetensors").stat().st_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/nncf_compare"))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--eval-size", type=int, default=48)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--only", type=int, action="append", help="train only this path (index 0-3; repeatable)")
    p.add_argument("--reuse", action="store_true", help="read finished runs under OUT instead of training them")
    args = p.parse_args()
    rows = {}
    for i, (name, (recipe, overrides)) in enumerate(PATHS.items()):
        out = args.out.resolve() / f"path{i}"
        if args.only is not None and i not in args.only:
            continue
        done = args.reuse and (out / "metrics.json").is_file()
        m = json.loads((out / "metrics.json").read_text()) if done else train(recipe, out, overrides, args)
        size = m["export"]["int4_model_bytes"] if "int4_model_bytes" in m["export"] else qlora_bytes(out)
        rows[name] = {"exact_match": m["after"]["exact_match"], "loss": m["after"]["loss"], "bytes": size,
                      "train_s": m["train"]["train_runtime"], "run": str(out)}
    lines = [f"{args.steps} steps of batch {args.batch}, seed {args.seed}, {args.eval_size} held-out questions",
             "", "| path | exact match | held-out loss | model on disk (MB) | train time (s) |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {r['exact_match']:.3f} | {r['loss']:.4f} | {r['bytes'] / 1e6:.0f} | {r['train_s']:.0f} |"
              for n, r in rows.items()]
    if args.only is not None:
        return print(json.dumps(rows, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "nncf_compare.md").write_text("\n".join(lines) + "\n")
    (args.out / "nncf_compare.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
