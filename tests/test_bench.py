"""bench/: the FLOP count of gpu.py --dry-run, the MFU, and run.py's JSON/table on a tiny real measured run."""

import json
import os
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


def test_gpu_dry_run_counts_the_flops_by_hand(tiny_llama_dir):
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(tiny_llama_dir).vocab_size
    out = _run("gpu.py", "--dry-run", "--model", str(tiny_llama_dir), "--r", "4", "--seq-len", "32").stdout
    # tiny Llama: hidden 64, intermediate 128, 2 layers, 4 heads of 16, 2 KV heads (k/v width 32)
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128  # q k v o + gate up down
    n_base = 2 * per_layer + 64 * vocab  # + lm_head
    n_adapter = 2 * 4 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 128))  # r=4, lm_head not adapted
    expected = 4 * n_base + 6 * n_adapter + 12 * 2 * 64 * 32
    assert f"N_base={n_base:,}" in out and f"N_adapter={n_adapter:,}" in out
    assert f"FLOPs/token = {expected:,}" in out
    assert "4*N_base + 6*N_adapter + 12*L*d_attn*S" in out


def test_mfu_and_peak():
    import flops

    assert flops.mfu(2000, 5e8, 100) == pytest.approx(0.01)  # 1e12 FLOP/s of 1e14
    assert flops.peak_tflops_of("NVIDIA H200") == 989.0
    assert flops.peak_tflops_of("a CPU") is None


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


def test_turns_alternate_steps_and_skip_finished_sides():
    """measure.py's Turns: one step per side in turn, each round starting one side later (A B C, B C A, C A B);
    a side that finished is skipped."""
    import threading

    from measure import Turns

    turns, log = Turns(3), []

    def side(index, steps):
        turns.wait(index)
        for step in range(steps):
            if step:
                turns.hand_over(index)
                turns.wait(index)
            log.append(index)
        turns.hand_over(index, finished=True)

    threads = [threading.Thread(target=side, args=(i, n)) for i, n in enumerate((4, 1, 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    # rounds: 0 1 2 | (1 finished) 2 0 | 2 0 | 0
    assert log == [0, 1, 2, 2, 0, 2, 0, 0]


def test_update_readme_replaces_only_the_table(tmp_path):
    import run

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{run.README_START}\nold\n{run.README_END}\nafter\n")
    run.update_readme(readme, "new table")
    assert readme.read_text() == f"intro\n{run.README_START}\nnew table\n{run.README_END}\nafter\n"
