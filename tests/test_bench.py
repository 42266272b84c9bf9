"""bench/: the FLOP count of gpu.py --dry-run, the MFU, and run.py's JSON/table on a tiny real measured run."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], env=env, capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _tiny_row_flops(line: str) -> tuple[float, int]:
    """(S, FLOPs/token) from a dry-run row line."""
    cells = [c.strip() for c in line.strip("|").split("|")]
    return float(cells[9]), int(cells[10].replace(",", ""))


def test_gpu_dry_run_counts_the_flops_by_hand_and_lists_every_row(tiny_llama_dir):
    import gpu
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(tiny_llama_dir).vocab_size
    out = _run("gpu.py", "--dry-run", "--model", str(tiny_llama_dir), "--sample", "256").stdout
    # tiny Llama: hidden 64, intermediate 128, 2 layers, 4 heads of 16, 2 KV heads (k/v width 32); LoRA r=8
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128  # q k v o + gate up down
    n_base = 2 * per_layer + 64 * vocab  # + lm_head
    n_adapter = 2 * 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 128))  # lm_head not adapted
    const, slope = 4 * n_base + 6 * n_adapter, 12 * 2 * 64
    assert f"N_base={n_base:,}" in out and f"N_adapter={n_adapter:,}" in out
    assert f"FLOPs/token = {const:,} + {slope:,} x S" in out
    assert "4*N_base + 6*N_adapter + 12*L*d_attn*S" in out and "MFU = useful tokens/s x FLOPs/token" in out
    assert "| H200 | 989 | 494.7 | 66.9 |" in out  # the peak table, per dtype
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert set(gpu.ROWS_BY_ID) <= set(rows)
    large = int(rows["lora"].split("|")[8])
    mean = float(re.search(r"records tokenized: mean ([\d.]+) tokens", out).group(1))
    assert large * mean >= 8192 and int(rows["lora-small"].split("|")[8]) == 8  # >= 8k useful tokens per step
    for row_id, line in rows.items():
        if row_id in gpu.ROWS_BY_ID:
            span, per_token = _tiny_row_flops(line)
            assert abs(per_token - (const + slope * span)) <= slope * 0.05 + 1, row_id  # S printed to 0.1
            assert "recipe error" not in line, line
    assert "| lora-fp32 |" in out and "| float32 | off | sdpa |" in rows["lora-fp32"]
    assert "| bfloat16 | bf16 | sdpa |" in rows["lora"] and "| stock |" in rows["stock"]
    # a kernel that does not import here: the row says it is skipped and why
    for row_id, module in (("flash", "flash_attn"), ("liger", "liger_kernel")):
        reason = gpu.probe(module)
        assert (f"skipped: {reason}" in rows[row_id]) if reason else ("runs" in rows[row_id])


def test_gpu_runs_its_rows_on_cpu_from_a_config(tmp_path):
    """bench/gpu.py end to end on CPU (--cpu, its test mode): random weights from a config (--config), the rows in
    one measure.py process with warm turns, the table, the per-round comparisons and the JSON."""
    from transformers import LlamaConfig

    config = tmp_path / "tiny.json"
    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                vocab_size=49152, tie_word_embeddings=True).to_json_file(config)
    out = _run("gpu.py", "--cpu", "--config", str(config), "--rows", "lora,stock,lora-small,stock-small,flash",
               "--tokens", "150", "--small-batch", "2", "--steps", "2", "--warmup", "1", "--sample", "128",
               "--out", str(tmp_path)).stdout
    (result,) = [json.loads(p.read_text()) for p in tmp_path.glob("gpu-*.json")]
    (model,) = result["models"].values()
    rows = model["rows"]
    assert model["random_weights"] and (Path(model["path"]) / "config.json").exists()
    for row_id in ("lora", "stock", "lora-small", "stock-small"):
        r = rows[row_id]
        assert len(r["step_times"]) == len(r["warm_times"]) == 2, row_id
        assert r["attn_implementation"] == "sdpa" and r["weights_dtype"] == "bfloat16" and r["autocast"] == "bf16"
    assert rows["lora-small"]["batch"] == 2 and rows["lora"]["batch"] == model["batches"]["large"]
    # flexrank and stock step through the same batches (the premise of the per-round ratios)
    assert rows["lora"]["useful_tokens_per_step"] == rows["stock"]["useful_tokens_per_step"]
    assert rows["lora-small"]["useful_tokens_per_step"] == rows["stock-small"]["useful_tokens_per_step"]
    assert "skipped" in rows["flash"]
    assert "| tiny (random weights) | lora | sdpa | bfloat16, autocast bf16 |" in out
    assert "| tiny (random weights) | flash | skipped: " in out
    assert "| flexrank LoRA vs stock Trainer + peft | " in out
    assert "| flexrank LoRA vs stock, small batch (the fixed per-step cost) | " in out
    assert result["table"] in out


def test_run_writes_json_and_table_from_a_measured_run(tiny_llama_dir, tmp_path):
    _run("run.py", "--only", "lora", "--backends", "single", "--steps", "2", "--warmup", "1", "--repeats", "1",
         "--shared-steps", "3", "--batch", "4", "--long-max-length", "64", "--model", str(tiny_llama_dir),
         "--out", str(tmp_path))
    (result_file,) = tmp_path.glob("*.json")
    result = json.loads(result_file.read_text())
    runs, shared = result["runs"], result["shared"]
    packed, padded = runs["flexrank lora single mixed packed"][0], runs["flexrank lora single mixed padded"][0]
    comps = {c["name"]: c for c in result["comparisons"]}
    # flexrank vs stock on one process: both in one process, one ratio per round of steps
    flex, stock = shared["flexrank lora single"], shared["stock lora single"]
    assert len(flex["step_times"]) == len(stock["step_times"]) == 3
    speed = comps["lora: flexrank vs stock"]
    assert speed["shared"] and speed["ratios"] == [pytest.approx(b / a) for a, b in zip(flex["step_times"],
                                                                                       stock["step_times"])]
    assert speed["met"] == (sorted(speed["ratios"])[1] >= 1.0)
    packing = comps["packing: packed vs padded (mixed-length)"]
    assert not packing["shared"]
    assert packing["median"] == pytest.approx(packed["useful_tokens_per_s"] / padded["useful_tokens_per_s"])
    # packed batches carry no padding; padded ones on mixed-length data do
    assert packed["padding_share"] == 0 and padded["padding_share"] > 0.2
    own = runs["flexrank lora single"][0]  # each shared side also ran once on its own, for its memory
    assert own["peak_memory_bytes"] > 100 * 2**20 and own["memory_kind"] == "rss"
    table = result_file.with_suffix(".md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| lora: flexrank vs stock"))
    assert (f"| single, one process | {flex['step_s']:.3f} | {stock['step_s']:.3f} | {speed['median']:.2f}x" in row
            and row.rstrip(" |").endswith(f"{own['peak_memory_bytes'] / 2**20:.0f} | "
                                          f"{runs['stock lora single'][0]['peak_memory_bytes'] / 2**20:.0f}"))


def _in_threads(side, args: list[tuple]) -> None:
    """One thread per side, `side(*args[i])`, all joined."""
    import threading

    threads = [threading.Thread(target=side, args=a) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)


def _take_turns(turns, steps: tuple[int, ...], turn) -> None:
    """Side i takes steps[i] turns through `turns` (measure.Turns), then finishes; `turn(i)` runs in each of them."""
    def side(index, count):
        turns.wait(index)
        for step in range(count):
            if step:
                turns.hand_over(index)
                turns.wait(index)
            turn(index)
        turns.hand_over(index, finished=True)

    _in_threads(side, list(enumerate(steps)))


def test_turns_alternate_steps_and_skip_finished_sides():
    """measure.py's Turns: one step per side in turn, each round starting one side later (A B C, B C A, C A B);
    a side that finished is skipped."""
    from measure import Turns

    log = []
    _take_turns(Turns(3), (4, 1, 3), log.append)
    # rounds: 0 1 2 | (1 finished) 2 0 | 2 0 | 0
    assert log == [0, 1, 2, 2, 0, 2, 0, 0]


def test_warm_turns_run_a_warm_pass_then_the_steps_in_each_rounds_order():
    """Turns(warm=True): each round is two passes in its rotated order, warm passes then timed steps; a finished
    side is skipped in both."""
    from measure import Turns

    turns, log = Turns(3, warm=True), []

    def warm_then_step(index):
        log.append(("warm", index))
        turns.hand_over(index)
        turns.wait(index)
        log.append(("step", index))

    _take_turns(turns, (2, 1, 2), warm_then_step)
    # round 0: warm 0 1 2, steps 0 1 2 | round 1 (order 1 2 0, side 1 finished): warm 2 0, steps 2 0
    assert log == [("warm", 0), ("warm", 1), ("warm", 2), ("step", 0), ("step", 1), ("step", 2),
                   ("warm", 2), ("warm", 0), ("step", 2), ("step", 0)]
    assert turns.log[:6] == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 1, 1), (0, 1, 2)]


def _shared_shapes(warm: bool, sides: int = 3, steps: int = 6):
    """Sides in one process stepping through the same batches (step k: shape k) with measure.py's TurnClock; a
    shape's first sight anywhere in the process is what costs (cuDNN's plan per shape on a GPU). Returns the
    events (kind, side, step, first sight) in order and the clocks."""
    import threading

    from measure import TurnClock, Turns

    turns, seen, events, lock = Turns(sides, warm=warm), set(), [], threading.Lock()
    clocks = [None] * sides

    def run_shape(kind, index, step):
        with lock:
            events.append((kind, index, step, step not in seen))
            seen.add(step)

    def side(index):
        current = {}
        clock = clocks[index] = TurnClock(turns, index, warm=lambda: run_shape("warm", index, current["step"]))
        turns.wait(index)
        for step in range(steps):
            current["step"] = step  # the Trainer has fetched the step's batch before on_step_begin
            clock.on_step_begin(None, None, None)
            run_shape("step", index, step)
            clock.on_step_end(None, None, None)
        turns.hand_over(index, finished=True)

    _in_threads(side, [(i,) for i in range(sides)])
    return events, clocks


def test_no_timed_step_meets_a_batch_shape_first():
    """The fair turn order: with warm turns every side has run each round's batch untimed before any side's timed
    step, so no timed step pays a first sight; the first sight of each round falls to the warm pass of the side
    leading the round, which the rotation gives every side equally often (and the clock records)."""
    events, clocks = _shared_shapes(warm=True)
    assert [e for e in events if e[0] == "step" and e[3]] == []
    assert [(kind, index, step) for kind, index, step, first in events if first] == [
        ("warm", r % 3, r) for r in range(6)]
    assert [c.warm_led for c in clocks] == [[r % 3 == i for r in range(6)] for i in range(3)]
    assert all(len(c.step_times()) == len(c.warm_times) == 6 for c in clocks)
    # Without warm turns (the old order) the first timed step of every round is the one that meets its shape first.
    events, _ = _shared_shapes(warm=False)
    assert [(kind, index, step) for kind, index, step, first in events if first] == [
        ("step", r % 3, r) for r in range(6)]


def test_mixed_records_keep_their_long_share_at_any_size():
    """corpus.py: small sets are as before (no repeats); a set larger than the 300 articles repeats them whole, so
    the GPU benchmark's large batches keep a quarter of long records."""
    import random
    from collections import Counter

    import corpus

    articles, sentences = corpus.news_articles(), corpus.review_sentences()
    rng = random.Random(0)  # the earlier draw: sample without replacement
    before = rng.sample(articles, 10) + rng.sample(sentences, 30)
    rng.shuffle(before)
    assert [r["text"] for r in corpus.mixed_records(40, seed=0)] == before
    big = [r["text"] for r in corpus.mixed_records(2000, seed=0)]
    long = Counter(t for t in big if t in set(articles))
    assert len(articles) == 300 and sum(long.values()) == 500
    source = Counter(articles)  # (the file repeats a few articles)
    assert all(source[a] <= long[a] <= 2 * source[a] for a in source)  # every one used before any is used twice


def test_peaks_by_dtype():
    import flops

    assert flops.peak_tflops_of("NVIDIA H200") == 989.0
    assert flops.peak_tflops_of("NVIDIA H100 80GB HBM3", "fp32") == 66.9
    assert flops.peak_tflops_of("NVIDIA H100 PCIe", "bf16") == 756.0  # not the SXM part's
    assert flops.peak_tflops_of("NVIDIA A100-SXM4-80GB", "tf32") == 156.0
    assert flops.fp32_compute("highest") == "fp32" and flops.fp32_compute("high") == "tf32"


def test_update_readme_replaces_only_the_table(tmp_path):
    import run

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{run.README_START}\nold\n{run.README_END}\nafter\n")
    run.update_readme(readme, "new table")
    assert readme.read_text() == f"intro\n{run.README_START}\nnew table\n{run.README_END}\nafter\n"


def test_subnet_quality_trains_searches_and_scores_the_compact_export(tiny_llama_dir, tmp_path):
    """bench/subnet_quality.py end to end on the tiny model (2 steps, 8 questions): the distilled importance-ordered
    way and plain LoRA; the searched row is the compact export, which scores what its subnet scores in the supernet,
    and the table lists the rows of the JSON."""
    from dist_helpers import recipe

    path = recipe(tmp_path, tiny_llama_dir, "elastic")
    result = tmp_path / "quality.json"
    proc = _run("subnet_quality.py", "--recipe", str(path), "--steps", "2", "--ways", "distill,lora", "--out",
         str(tmp_path / "runs"), "--json", str(result),
         "--set", "adapter.elastic.base_widths={mlp: [128, 96, 64]}", "--set", "data.eval_size=8",
         "--set", "adapter.elastic.evaluate_subnets=[maximal, heuristic]", "--set", "eval.after=true",
         "--set", "eval.metrics=[loss, exact_match]", "--set", "adapter.elastic.importance_samples=8",
         "--search-set", "search.eval_size=4", "--search-set", "search.num_evals=4", "--search-set",
         "search.population=4")
    results = json.loads(result.read_text())["results"]
    distill, lora = results["distill"]["rows"], results["lora"]["rows"]
    searched = distill["searched"]
    assert searched["loss"] == pytest.approx(searched["in_supernet"]["loss"], abs=1e-4)
    assert searched["exact_match"] == searched["in_supernet"]["exact_match"]
    assert distill["heuristic"]["params"] < distill["maximal"]["params"]
    assert searched["params"] <= distill["maximal"]["params"] and set(lora) == {"maximal"}
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")][1:]
    assert [line.split("|")[2].strip() for line in table] == ["maximal", "heuristic", "searched", "maximal"]
    assert f"| {searched['params'] / 1e6:.1f} | {searched['params'] / distill['maximal']['params']:.0%} | " \
           f"{searched['exact_match']:.3f} |" in table[2]
    import yaml

    elastic = yaml.safe_load((tmp_path / "runs" / "distill" / "config.yaml").read_text())["adapter"]["elastic"]
    assert elastic["importance"] == "activation" and elastic["distill"]["weight"] == 0.5
    assert json.loads((tmp_path / "runs" / "distill" / "metrics.json").read_text())["importance"]["moved"] > 0
