"""GPU benchmark at a workload users run: tokens/s, peak memory and MFU of LoRA training with bf16, packed batches
of thousands of useful tokens, SDPA vs flash-attn 2 vs liger, LoRA vs QLoRA, the controllers, and the stock
Trainer + peft, for the bundled SmolLM2-135M and a ~1B Llama-shaped model, in one table:

    python bench/gpu.py                      # SmolLM2-135M + the Llama-3.2-1B shape of bench/configs/ (random weights)
    python bench/gpu.py --model /path/to/Llama-3.2-1B --model smollm2-135m-instruct
    python bench/gpu.py --config bench/configs/llama-3.2-1b-shape.json --rows lora,stock,lora-fp32
    python bench/gpu.py --dry-run            # CPU: every row, its settings, tokens/step and FLOPs/token
    python bench/gpu.py --cpu --config bench/configs/host-bound-30-layers.json --rows lora-small,stock-small
                                             # CPU: the fixed per-step cost, flexrank vs stock (almost no arithmetic)

Models: --model takes a bundled name, a local folder or a hub id (flexrank's resolution; HF_HUB_OFFLINE is
honoured); --config a config JSON (or a folder with config.json): random bf16 weights are built from it on the GPU
once (cached under $FLEXRANK_CACHE/bench-models, with the bundled SmolLM2 tokenizer), which the table says.
Throughput, memory and MFU do not depend on the weights.

dtype: flexrank recommends model.dtype: bfloat16 together with training.bf16: true on a GPU (the main rows). bf16
weights halve the frozen base's memory and its matmuls run in bf16 with no per-step casts; peft keeps the LoRA
weights in fp32 (its autocast_adapter_dtype), which is what the optimizer should update, and training.bf16
(autocast) runs their matmuls in bf16 too and keeps the activations bf16 between base and adapter. With
model.dtype: float32 + training.bf16 the frozen base is held in fp32 (twice the memory) and cast to bf16 at every
forward; with model.dtype: bfloat16 alone the adapters run in fp32, their inputs cast up at every adapted layer.
Rows lora-bf16-weights and lora-fp32 measure the alternatives.

Rows run in one process per model (measure.py "sides": each side builds its model once, then all take one optimizer
step each in turn, every step's batch shape warmed for every side first, so a row costs seconds of steps, not a
process and a model load). The liger row has a process of its own: liger-kernel patches transformers' Llama module
(rotary embedding, RMSNorm and MLP classes) for the whole process, which would change the other rows' kernels. A
row whose kernel does not import here is skipped with the reason.
"""

import argparse
import datetime
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# Set before transformers is imported, and inherited by the measuring processes: no kernels fetched from Hub
# repositories mid-benchmark (transformers' `kernels` integration; offline GPU machines), no progress bars.
os.environ.setdefault("USE_HUB_KERNELS", "NO")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import flops  # noqa: E402
from measure import LORA, METHODS  # noqa: E402

DEFAULT_CONFIG = HERE / "configs" / "llama-3.2-1b-shape.json"
BUNDLED = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Row:
    id: str
    label: str
    side: str = "flexrank"  # flexrank | stock
    method: str = "lora"  # a measure.METHODS key
    dtype: str = "bfloat16"  # model.dtype (the frozen weights)
    bf16: bool = True  # training.bf16 (autocast)
    attention: str = "sdpa"  # model.attn_implementation (flexrank's recipe key: auto | sdpa | varlen | flash_attention_2)
    liger: bool = False  # model.liger_kernel
    batch: str = "large"  # large (>= --tokens useful tokens per step) | small (--small-batch examples)
    needs: tuple[str, ...] = ()  # optional kernels (probe names) without which the row is skipped (all need CUDA)
    own_process: bool = False  # kernels that patch the process (liger)

    @property
    def compute(self) -> str:
        """The dtype the big matmuls run in (which peak the MFU is taken against)."""
        return "bf16" if self.dtype == "bfloat16" or self.bf16 else "fp32"


ROWS = [
    Row("lora", "flexrank LoRA, SDPA"),
    Row("stock", "stock Trainer + peft LoRA, SDPA", side="stock"),
    Row("lora-auto", "flexrank LoRA, attention auto (flexrank's choice)", attention="auto"),
    Row("lora-bf16-weights", "flexrank LoRA, SDPA, bf16 weights without autocast", bf16=False),
    Row("lora-fp32", "flexrank LoRA, SDPA, fp32", dtype="float32", bf16=False),
    Row("lora-small", "flexrank LoRA, SDPA, small batch (the fixed per-step cost)", batch="small"),
    Row("stock-small", "stock Trainer + peft LoRA, SDPA, small batch", side="stock", batch="small"),
    # flexrank's varlen attention (models/varlen.py: flash-attn / torch varlen in bf16 on CUDA, else SDPA per record):
    # no dense packed mask, no cuDNN plan per new shape; bf16 should then be at least as fast as fp32
    Row("varlen", "flexrank LoRA, varlen attention", attention="varlen"),
    Row("varlen-fp32", "flexrank LoRA, varlen attention, fp32", attention="varlen", dtype="float32", bf16=False),
    Row("flash", "flexrank LoRA, flash-attn 2", attention="flash_attention_2", needs=("flash_attn",)),
    Row("qlora", "flexrank QLoRA NF4 (bf16 compute), SDPA", method="qlora", needs=("bitsandbytes",)),
    Row("elastic", "elastic supernet, SDPA", method="elastic"),
    Row("adalora", "AdaLoRA, SDPA", method="adalora"),
    Row("sora", "SoRA, SDPA", method="sora"),
    Row("liger", "flexrank LoRA, SDPA + liger", liger=True, needs=("liger_kernel",), own_process=True),
]

ROWS_BY_ID = {r.id: r for r in ROWS}

# (name, A, B, metric): speedup = B's step time / A's (same batches), overhead = A's / B's - 1; per round of steps.
COMPARISONS = [
    ("flexrank LoRA vs stock Trainer + peft", "lora", "stock", "speedup"),
    ("flexrank LoRA vs stock, small batch (the fixed per-step cost)", "lora-small", "stock-small", "speedup"),
    ("bf16 (weights + autocast) vs fp32", "lora", "lora-fp32", "speedup"),
    ("bf16 weights: with autocast vs without", "lora", "lora-bf16-weights", "speedup"),
    ("attention auto vs SDPA", "lora-auto", "lora", "speedup"),
    ("varlen vs SDPA with the dense packed mask", "varlen", "lora", "speedup"),
    ("bf16 vs fp32, varlen attention", "varlen", "varlen-fp32", "speedup"),
    ("flash-attn 2 vs SDPA", "flash", "lora", "speedup"),
    ("QLoRA NF4 vs LoRA", "qlora", "lora", "overhead"),
    ("elastic vs flexrank LoRA", "elastic", "lora", "overhead"),
    ("AdaLoRA vs flexrank LoRA", "adalora", "lora", "overhead"),
    ("SoRA vs flexrank LoRA", "sora", "lora", "overhead"),
    ("liger vs SDPA (separate processes)", "liger", "lora", "speedup"),
]


def probe(name: str) -> str | None:
    """Why the optional piece `name` cannot run here, or None when it can (flash-attn and liger must import;
    bitsandbytes must quantize a tensor on the GPU)."""
    import importlib

    import torch

    if name == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device"
    try:
        importlib.import_module(name)
    except Exception as exc:  # ImportError, or a broken build failing at import (e.g. a CUDA mismatch)
        return f"{name} does not import here ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    if not torch.cuda.is_available():
        return None  # importable; its CUDA side is checked where there is a GPU
    if name == "flash_attn" and torch.cuda.get_device_capability()[0] < 8:
        return f"flash-attn needs compute capability >= 8.0 (this GPU: {torch.cuda.get_device_capability()})"
    if name == "bitsandbytes":
        try:
            importlib.import_module("bitsandbytes.functional").quantize_4bit(
                torch.ones(64, 64, device="cuda", dtype=torch.bfloat16), quant_type="nf4")
        except Exception as exc:
            return f"bitsandbytes cannot quantize on this GPU ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    return None


def package_versions() -> dict[str, str]:
    """Versions of the optional packages the rows use, or why they do not import."""
    from importlib import metadata

    out = {}
    for module, dist in (("flash_attn", "flash-attn"), ("liger_kernel", "liger-kernel"),
                         ("bitsandbytes", "bitsandbytes")):
        reason = probe(module)
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = None
        out[dist] = reason or f"{version} (imports)"
    return out


# ---------------------------------------------------------------------------------------------------- models


@dataclass
class Model:
    label: str
    config: object  # transformers config
    path: Path | None  # the weights' folder (None: random weights, built at run time)
    config_file: Path | None = None
    stats: dict = field(default_factory=dict)  # of the mixed-length set under this model's tokenizer

    @property
    def random(self) -> bool:
        return self.config_file is not None


def model_from_name(name: str) -> Model:
    from transformers import AutoConfig

    from flexrank.config import load_config
    from flexrank.models.loading import _model_path

    path = _model_path(load_config(raw={"model": {"name_or_path": name}}).model)
    return Model(label=name, config=AutoConfig.from_pretrained(path), path=path)


def model_from_config(file: str) -> Model:
    from transformers import AutoConfig

    file = Path(file)
    file = file / "config.json" if file.is_dir() else file
    return Model(label=f"{file.stem} (random weights)", config=AutoConfig.from_pretrained(file),
                 path=None, config_file=file)


def random_weights(model: Model) -> Path:
    """The folder of random bf16 weights for `model.config_file` with the bundled SmolLM2 tokenizer: built once,
    on the GPU where there is one, and cached by the config's content."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flexrank.io import atomic_path, cache_dir
    from flexrank.models.assets import smollm2_dir

    text = model.config_file.read_text()
    out = cache_dir("bench-models") / f"{model.config_file.stem}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"
    if (out / "config.json").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    if model.config.vocab_size < len(tokenizer):
        sys.exit(f"{model.config_file}: vocab_size {model.config.vocab_size} < the bundled tokenizer's {len(tokenizer)}"
                 " tokens: set vocab_size to at least that")
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        weights = AutoModelForCausalLM.from_config(model.config, dtype=torch.bfloat16)
    weights.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with atomic_path(out, keep_existing=True) as tmp:
        weights.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    del weights
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def corpus_stats(model: Model, max_length: int, sample: int) -> dict:
    """Mean example length and mean attention span (sum len^2 / sum len) of the mixed-length set (corpus.py) under
    the model's tokenizer, from `sample` records: what sizes the batches before a run, and the dry run's S."""
    import corpus
    from measure import run_config

    from flexrank.data.pipeline import tokenize
    from flexrank.models.loading import load_tokenizer

    cfg = run_config({"model": str(model.path) if model.path else BUNDLED, "method": "lora", "max_length": max_length,
                      "packing": True, "batch": 1, "warmup": 0, "steps": 1, "out": "unused"})
    dataset = tokenize(cfg, load_tokenizer(cfg.model), corpus.mixed_records(sample, seed=1), "text")
    lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    return {"mean_length": statistics.mean(lengths), "span": sum(n * n for n in lengths) / sum(lengths),
            "records": len(lengths)}


def batch_sizes(stats: dict, a) -> dict[str, int]:
    """large: enough examples for a.tokens useful tokens per step with 10% to spare (steps vary), small: a.small_batch."""
    return {"large": math.ceil(1.1 * a.tokens / stats["mean_length"]), "small": a.small_batch}


# ---------------------------------------------------------------------------------------------------- the plan


def side_spec(row: Row, batches: dict[str, int], cpu: bool = False) -> dict:
    """The row as one side of measure.py: flexrank's recipe keys (model.dtype, model.attn_implementation,
    model.liger_kernel, training.bf16), the stock side reading the same ones (stock.py). cpu: --cpu's rows (bf16
    autocast on CPU needs training.use_cpu)."""
    model_extra = {"dtype": row.dtype, "attn_implementation": row.attention}
    if row.liger:
        model_extra["liger_kernel"] = True
    if row.method == "qlora":
        model_extra["quantization"] = {**METHODS["qlora"]["model"]["quantization"], "bnb_4bit_compute_dtype": "bfloat16"}
    return {"row": row.id, "side": row.side, "method": row.method, "data": "mixed", "packing": True,
            "batch": batches[row.batch], "model_extra": model_extra,
            "training_extra": {"bf16": row.bf16, **({"use_cpu": True} if cpu else {})}}


def plan(rows: list[Row], cpu: bool) -> dict[str, str | None]:
    """Row id -> why it is skipped (None: it runs): its optional kernel first, then CUDA. With --cpu (the
    script's own test on CPU) the plain rows run on CPU and the rows of GPU-only kernels are skipped."""
    reasons, cache = {}, {}
    for row in rows:
        for n in row.needs + (() if cpu else ("cuda",)):
            if n not in cache:
                cache[n] = probe(n)
        missing = [cache[n] for n in row.needs + (() if cpu else ("cuda",))]
        reasons[row.id] = next((m for m in missing if m), None)
        if cpu and row.needs and reasons[row.id] is None:
            reasons[row.id] = "a GPU-only kernel (--cpu)"
    return reasons


def validate(row: Row, model: Model, batches: dict[str, int], a) -> str | None:
    """The row's recipe through flexrank's recipe checks (no weights): the error, or None."""
    from measure import run_config

    name = str(model.path) if model.path else BUNDLED  # a random model's folder exists only at run time
    spec = {**side_spec(row, batches, a.cpu), "model": name, "max_length": a.seq_len, "warmup": a.warmup,
            "steps": a.steps, "out": "unused"}
    try:
        run_config(spec)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# ---------------------------------------------------------------------------------------------------- dry run


def peak_table() -> list[str]:
    lines = ["| GPU (name contains) | bf16 | tf32 | fp32 |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['bf16']:g} | {v['tf32']:g} | {v['fp32']:g} |" for k, v in flops.PEAK_TFLOPS.items()]
    return lines


def header() -> list[str]:
    return [flops.FORMULA,
            "  4*N_base: the frozen base's matmuls, forward + backward through the activations (no weight gradients);"
            " 6*N_adapter: the adapters, with weight gradients; 12*L*d_attn*S: attention QK^T and AV, forward +"
            " backward, S = the mean span a token attends over, sum(len^2) / sum(len) over its examples (useful"
            " work only: no padding, no cross-example attention a dense packed mask computes)",
            flops.MFU_FORMULA,
            "Dense peak TFLOP/s by the dtype the matmuls run in (vendors' data sheets; fp32 = CUDA cores, torch's"
            " default float32 matmul precision 'highest'; tf32 when it is 'high'/'medium'; --peak-tflops overrides"
            " bf16):", *peak_table()]


def shapes_lines(model: Model, s) -> list[str]:
    lines = [f"L={s.layers} d_attn={s.d_attn} N_base={s.n_base:,} N_adapter={s.n_adapter:,} "
             f"(r={LORA['r']}, {LORA['target_modules']})"]
    seen = {}
    for n, i, o in s.linears:  # one line per distinct Linear shape, with how many there are
        key = (n.rsplit(".", 1)[-1], i, o)
        seen[key] = seen.get(key, 0) + 1
    lines += [f"  {leaf:12s} {i:6d} x {o:6d}  x{count}" for (leaf, i, o), count in seen.items()]
    const = flops.flops_per_token(s, 0)
    lines.append(f"  FLOPs/token = {const:,} + {flops.flops_per_token(s, 1) - const:,} x S")
    return lines


def dry_run(models: list[Model], rows: list[Row], a) -> str:
    import torch

    reasons = plan(rows, cpu=False)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device here"
    lines = ["bench/gpu.py --dry-run: the rows a run measures, their settings, tokens/step and FLOPs/token; nothing "
             "is trained.", *header(), "",
             f"Device: {device}. Optional kernels here: "
             + "; ".join(f"{k}: {v}" for k, v in package_versions().items()),
             f"Each model: one process with every row but liger (own process), {a.warmup} warm-up + {a.steps} "
             "measured rounds, one optimizer step per row per round in rotated order, each round's batches warmed "
             "for every row first (untimed forward + backward)."]
    for model in models:
        s = flops.shapes(model.config, LORA["r"])
        st, batches = model.stats, batch_sizes(model.stats, a)
        weights = f"weights: {model.path}"
        if model.random:
            where = model.config_file.resolve()
            where = where.relative_to(HERE.parent) if where.is_relative_to(HERE.parent) else where
            weights = f"weights built from {where} on the GPU at run time"
        lines += ["", f"== {model.label.removesuffix(' (random weights)')} ({'random ' if model.random else ''}"
                  f"{weights}) ==", *shapes_lines(model, s),
                  f"mixed-length set (bench/corpus.py) at max_length {a.seq_len}, {st['records']} records tokenized: "
                  f"mean {st['mean_length']:.1f} tokens, S = {st['span']:.1f}",
                  f"batches: large {batches['large']} examples (~{batches['large'] * st['mean_length']:,.0f} useful "
                  f"tokens/step; --tokens {a.tokens:,}), small {batches['small']} (~"
                  f"{batches['small'] * st['mean_length']:,.0f})", "",
                  "| row | what | side | weights | autocast | attention | liger | batch | tokens/step | S | "
                  "FLOPs/token | peak dtype | process | status |", "|" + "---|" * 14]
        for row in rows:
            problem = validate(row, model, batches, a)
            status = (f"recipe error: {problem}" if problem else
                      f"skipped: {reasons[row.id]}" if reasons[row.id] and reasons[row.id] != "no CUDA device" else
                      "runs (needs CUDA)" if reasons[row.id] else "runs")
            n = batches[row.batch]
            lines.append(f"| {row.id} | {row.label} | {row.side} | {row.dtype} | {'bf16' if row.bf16 else 'off'} | "
                         f"{row.attention} | {'on' if row.liger else 'off'} | {n} | ~{n * st['mean_length']:,.0f} | "
                         f"{st['span']:.1f} | {flops.flops_per_token(s, st['span']):,.0f} | {row.compute} | "
                         f"{'own' if row.own_process else 'shared'} | {status} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- run


def measure_process(model: Model, rows: list[Row], batches: dict[str, int], a, workdir: Path) -> dict[str, dict]:
    """One measure.py process with `rows` as its sides: row id -> its result (or {"error": ...})."""
    from run import _run_measure

    out = workdir / f"{rows[0].id}-{len(rows)}"
    spec = {"model": str(model.path), "side": "flexrank", "method": "lora", "data": "mixed", "packing": True,
            "batch": batches["large"], "warmup": a.warmup, "steps": a.steps, "max_length": a.seq_len,
            "out": str(out), "warm": True, "sides": [side_spec(r, batches, a.cpu) for r in rows]}
    try:
        _run_measure(spec, "single", f"{model.label}: {', '.join(r.id for r in rows)}")
    except RuntimeError as exc:
        tail = str(exc).strip().splitlines()[-1][:200]
        return {r.id: {"error": f"the process failed: {tail}"} for r in rows}
    path = out.with_name(out.name + ".shared.json")
    sides = json.loads(path.read_text())["sides"]
    path.unlink()
    return {r.id: s for r, s in zip(rows, sides)}


def spread(xs: list[float]) -> str:
    return f"[{min(xs):.2f}, {max(xs):.2f}]"


def comparisons(results: dict[str, dict]) -> list[str]:
    lines = ["| comparison | ratio median [min, max] over rounds |", "|---|---|"]
    for name, a_id, b_id, metric in COMPARISONS:
        a, b = results.get(a_id), results.get(b_id)
        if not a or not b or "error" in a or "error" in b or "skipped" in a or "skipped" in b:
            continue
        pairs = list(zip(a["step_times"], b["step_times"]))
        if metric == "speedup":
            ratios = [tb / ta for ta, tb in pairs]
            lines.append(f"| {name} | {statistics.median(ratios):.2f}x {spread(ratios)} |")
        else:
            ratios = [100 * (ta / tb - 1) for ta, tb in pairs]
            lines.append(f"| {name} | {statistics.median(ratios):+.1f}% [{min(ratios):+.1f}, {max(ratios):+.1f}] |")
    small, large = results.get("lora-small"), results.get("lora")
    if small and large and "step_s" in small and "step_s" in large:
        ts, tl = small["step_s"], large["step_s"]
        ns, nl = small["useful_tokens_per_step"], large["useful_tokens_per_step"]
        if nl > ns:  # step time = fixed + per-token x tokens, through the two batch sizes
            fixed = (ts * nl - tl * ns) / (nl - ns)
            lines.append(f"| fixed per-step cost (lora-small and lora: s/step = fixed + tokens x per-token) | "
                         f"{fixed:.3f} s of {tl:.3f} s/step at {nl:,.0f} tokens |")
    return lines


def row_line(model: Model, row: Row, r: dict, s, peaks: dict[str, float | None]) -> str:
    if "skipped" in r or "error" in r:
        what = f"skipped: {r['skipped']}" if "skipped" in r else f"failed: ...{r['error'][-200:]}"
        return f"| {model.label} | {row.id} | {what} |" + " |" * 10
    tokens_s = r["useful_tokens_per_step"] / r["step_s"]
    flops_token = flops.flops_per_token(s, r["attention_span"])
    compute = row.compute if row.compute == "bf16" else flops.fp32_compute(r["float32_matmul_precision"])
    peak = peaks.get(compute)
    util = f"{100 * flops.mfu(tokens_s, flops_token, peak):.1f}% of {peak:g} ({compute})" if peak else "n/a"
    led = [t for t, first in zip(r["warm_times"], r["warm_led"]) if first]
    seen = [t for t, first in zip(r["warm_times"], r["warm_led"]) if not first]
    warm = (f"{statistics.median(led):.3f}" if led else "-") + " / " + (f"{statistics.median(seen):.3f}" if seen else "-")
    memory = f"{r['cuda_max_allocated'] / 2**30:.2f}" if r.get("cuda_max_allocated") else "-"
    weights = f"{r['weights_dtype']}, autocast {r['autocast'] or 'off'}{', liger' if r['liger'] else ''}"
    return (f"| {model.label} | {row.id} | {r['attn_implementation']} | {weights} | {r.get('batch', '')} | "
            f"{r['useful_tokens_per_step']:,.0f} (min {r['useful_tokens_min']:,.0f}) | {r['step_s']:.3f} | "
            f"{tokens_s:,.0f} | {warm} | {memory} | {flops_token:,.0f} (S {r['attention_span']:.0f}) | {util} |")


def run(models: list[Model], rows: list[Row], a) -> str:
    import torch

    reasons = plan(rows, cpu=a.cpu)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    peaks = {c: flops.peak_tflops_of(device, c) for c in ("bf16", "tf32", "fp32")}
    if a.peak_tflops:
        peaks["bf16"] = a.peak_tflops
    started, now = datetime.datetime.now(), None
    lines = [f"`python bench/gpu.py {' '.join(a.argv)}` on {started:%Y-%m-%d %H:%M}, {device}, torch "
             f"{torch.__version__}; peaks used (TFLOP/s): "
             + (", ".join(f"{k} {v:g}" for k, v in peaks.items() if v) or "none known for this device (MFU n/a)"),
             *header(), "", "Optional kernels: " + "; ".join(f"{k}: {v}" for k, v in package_versions().items()),
             f"{a.warmup} warm-up + {a.steps} measured rounds; one process per model (liger: its own), one optimizer "
             "step per row per round in rotated order, each round's batches warmed for every row first. s/step: "
             "median over the measured rounds; warm pass s: median untimed forward + backward when the row met the "
             "round's batch shape first / when another row had (their difference is what a new shape costs); peak "
             "GiB: the row's own tensors + the most its step allocated on top.", "",
             "| model | row | attention (ran) | weights | batch | useful tokens/step | s/step | tokens/s | "
             "warm pass s: first / seen | peak GiB | FLOPs/token | MFU |", "|" + "---|" * 12]
    report = {"device": device, "peaks": peaks, "argv": a.argv, "models": {}}
    tails = []
    with tempfile.TemporaryDirectory(prefix="flexrank-gpu-bench-") as tmp:
        for model in models:
            if model.random:
                model.path = random_weights(model)
            s = flops.shapes(model.config, LORA["r"])
            batches = batch_sizes(model.stats, a)
            results = {r.id: {"skipped": reasons[r.id]} for r in rows if reasons[r.id]}
            runnable = [r for r in rows if not reasons[r.id]]
            shared = [r for r in runnable if not r.own_process]
            if shared:
                results.update(measure_process(model, shared, batches, a, Path(tmp)))
            for row in (r for r in runnable if r.own_process):
                results.update(measure_process(model, [row], batches, a, Path(tmp)))
            for row in rows:
                if "step_s" in results[row.id]:
                    results[row.id]["batch"] = batches[row.batch]
                lines.append(row_line(model, row, results[row.id], s, peaks))
            tails += ["", f"{model.label}:", *comparisons(results)]
            report["models"][model.label] = {"path": str(model.path), "random_weights": model.random,
                                             "batches": batches, "rows": results}
    now = datetime.datetime.now()
    lines += tails + ["", f"{(now - started).total_seconds():.0f} s in all."]
    text = "\n".join(lines)
    out = Path(a.out)
    stem = f"gpu-{started:%Y-%m-%d_%H%M%S}"
    from flexrank.io import write_atomic

    write_atomic(out / f"{stem}.json", json.dumps({**report, "table": text}, indent=1))
    write_atomic(out / f"{stem}.md", text + "\n")
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], help="repeatable: a bundled name, local folder or hub id")
    p.add_argument("--config", action="append", default=[],
                   help="repeatable: a config JSON or folder, random weights (default with no --model: "
                        f"{DEFAULT_CONFIG.relative_to(HERE.parent)})")
    p.add_argument("--rows", help="comma-separated row ids (default: all): " + ", ".join(r.id for r in ROWS))
    p.add_argument("--dry-run", action="store_true", help="print the rows, settings, tokens/step and FLOPs/token")
    p.add_argument("--tokens", type=int, default=8192, help="useful tokens per step of the large batch (at least)")
    p.add_argument("--small-batch", type=int, default=8, help="examples per step of the small-batch row")
    p.add_argument("--seq-len", type=int, default=512, help="max_length of an example (the data's)")
    p.add_argument("--steps", type=int, default=10, help="measured rounds")
    p.add_argument("--warmup", type=int, default=3, help="rounds before the measured ones")
    p.add_argument("--sample", type=int, default=2048, help="records tokenized to size the batches")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: by name)")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--cpu", action="store_true",
                   help="run the rows on the CPU (bf16 autocast too): the per-step host cost without a GPU, e.g. with "
                        "--config bench/configs/host-bound-30-layers.json --rows lora-small,stock-small")
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    if not a.model and not a.config:
        a.model, a.config = [BUNDLED], [str(DEFAULT_CONFIG)]
    ids = [r.id for r in ROWS]
    a.rows = a.rows.split(",") if a.rows else ids
    if unknown := [r for r in a.rows if r not in ids]:
        p.error(f"--rows: unknown {', '.join(unknown)}; rows: {', '.join(ids)}")
    return a


def main(argv=None) -> str:
    a = parse_args(argv)
    import torch

    if not a.dry_run and not a.cpu and not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs CUDA (use --dry-run on CPU)")
    rows = [r for r in ROWS if r.id in a.rows]
    models = [model_from_name(m) for m in a.model] + [model_from_config(c) for c in a.config]
    for model in models:
        model.stats = corpus_stats(model, a.seq_len, a.sample)
    text = dry_run(models, rows, a) if a.dry_run else run(models, rows, a)
    print(text)
    return text


if __name__ == "__main__":
    main()
