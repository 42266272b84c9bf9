"""flexrank against the baseline a user would otherwise write (stock transformers.Trainer + peft.get_peft_model),
in one command: median step time after warm-up, useful (non-padding) tokens/s and peak memory per method and
backend; controller overhead against flexrank's own LoRA; padding-free packing against padded batches on a real
mixed-length set (corpus.py).

    python bench/run.py --quick                 # CI-sized
    python bench/run.py                          # every method on 1 process and on DDP, ZeRO-3, FSDP2
    python bench/run.py --only lora --steps 2 --repeats 1 --backends single

Every measurement is its own process (measure.py; `accelerate launch` with flexrank's own configs for 2
processes, as `flexrank train --backend` does), so peak memory is per measurement: RSS of the whole process tree
(sampled) on CPU, torch.cuda.max_memory_allocated summed over ranks on GPU. The measurements of a round run one
after the other and the rounds alternate their order (A B ... B A ...), so machine noise and drift hit both sides
of a ratio; each ratio is taken within a round and reported as the median [min-max] over rounds.
The rows with a target on one process (flexrank LoRA vs stock, each controller vs flexrank LoRA) are measured more
finely: their sides share one process and take one optimizer step each in turn (measure.py "sides"; each round's
batch first run untimed by every side, so that no side's timed step pays a first sight of a batch shape), each ratio
is taken per round of steps (`--shared-steps` rounds), and each side also runs once in a process of its own for
its peak memory. Between processes, step times on a 2-core machine differ by 5-15% with nothing else running, more
than the 3% a controller may cost; within one process the sides see the same machine state (steps still vary by
about 10% on such a machine, hence many rounds).
Writes bench/results/<date>.json and .md, prints the table; --update-readme puts it into bench/README.md.
"""

import argparse
import datetime
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import psutil
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from measure import METHODS  # noqa: E402
from stock import STOCK_METHODS  # noqa: E402

from flexrank.launcher.launch import free_port, launch_command  # noqa: E402
from flexrank.io import write_atomic  # noqa: E402

DIST_BACKENDS = ("ddp", "zero3", "fsdp2")
# What flexrank does not run on a sharded backend (config.py refuses it): nncf's hooks need whole weights.
UNSHARDABLE = {"nncf_int4": ("zero3", "fsdp2")}
CONTROLLERS = ("elastic", "adalora", "sora")  # overhead target: <= 3% step time over flexrank LoRA
EVAL_BENCH = HERE / "eval_time.py"  # evaluation on 1 vs 2 processes, run with --eval
README_START, README_END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


@dataclass(frozen=True)
class Variant:
    side: str  # flexrank | stock
    method: str
    backend: str = "single"
    data: str = "analogy"  # analogy (the bundled task) | mixed (corpus.py, for packing)
    packing: bool = False

    @property
    def key(self) -> str:
        extra = f" {self.data}{' packed' if self.packing else ' padded'}" if self.data != "analogy" else ""
        return f"{self.side} {self.method} {self.backend}{extra}"


@dataclass
class Comparison:
    """ratio = metric(a) / metric(b) per round; `target` is the bound it must meet (None: reported only)."""
    name: str
    a: Variant
    b: Variant
    metric: str  # speedup (b's step time / a's), overhead (a's step time / b's - 1), tokens (a's tokens/s / b's)
    target: tuple[str, float] | None = None  # (">=" | "<=", bound)
    shared: bool = False  # both sides in one process, steps taken in turn (measure_shared); else process rounds
    ratios: list[float] = field(default_factory=list)


def plan(methods, backends, quick: bool) -> list[Comparison]:
    comps = []
    for backend in backends:
        # 2-process runs cost several times a 1-process one: --quick compares LoRA only there.
        for method in (methods if backend == "single" or not quick else [m for m in methods if m == "lora"]):
            if backend in UNSHARDABLE.get(method, ()):
                continue
            flex = Variant("flexrank", method, backend)
            # The rows with a target on one process: one process, steps in turn (see the module docstring).
            if method in STOCK_METHODS:
                comps.append(Comparison(f"{method}: flexrank vs stock", flex, Variant("stock", method, backend),
                                        "speedup", (">=", 1.0) if method == "lora" else None,
                                        shared=method == "lora" and backend == "single"))
            if method != "lora" and "lora" in methods:
                comps.append(Comparison(f"{method}: overhead vs flexrank LoRA", flex,
                                        Variant("flexrank", "lora", backend), "overhead",
                                        ("<=", 0.03) if method in CONTROLLERS else None,
                                        shared=method in CONTROLLERS and backend == "single"))
    if "single" in backends and "lora" in methods:
        comps.append(Comparison("packing: packed vs padded (mixed-length)",
                                Variant("flexrank", "lora", data="mixed", packing=True),
                                Variant("flexrank", "lora", data="mixed"), "tokens", (">=", 1.5)))
    return comps


class PeakRss:
    """Samples the summed RSS of a process and all its descendants every 50 ms; `peak` is the largest sum."""

    def __init__(self, pid: int):
        self.proc, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                procs = [self.proc] + self.proc.children(recursive=True)
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:  # a child ended between listing and reading
                pass
            self._stop.wait(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _spec(v: Variant, a, out: Path, extra: dict | None = None) -> dict:
    return {**asdict(v), **(extra or {}), "model": a.model, "batch": a.batch, "steps": a.steps, "warmup": a.warmup,
            "max_length": a.long_max_length if v.data == "mixed" else a.max_length, "out": str(out)}


def _run_measure(spec: dict, backend: str, label: str) -> tuple[int, float]:
    """Runs measure.py on `backend`; returns the peak RSS of its process tree and the wall time."""
    script = [str(HERE / "measure.py"), json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    if backend == "single":
        cmd = [sys.executable] + script
    else:  # flexrank's own launch (launcher/launch.py), with this script in place of `-m flexrank ...`
        dist = SimpleNamespace(backend=backend, nproc=2, nnodes=1, node_rank=0, main_process_port=free_port(),
                               main_process_ip=None, deepspeed_config=None)
        cmd, extra = launch_command(dist, [])
        cmd, env = cmd[:-2] + script, {**env, **extra}
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=HERE.parent)
        rss = PeakRss(proc.pid)
        rc = proc.wait()
        peak = rss.stop()
        if rc != 0:
            log.seek(0)
            tail = "\n".join(log.read().strip().splitlines()[-60:])
            raise RuntimeError(f"{label}: measure.py exited {rc}:\n{tail}")
    return peak, time.perf_counter() - start


def measure(v: Variant, a, workdir: Path, extra: dict | None = None) -> dict:
    """One measurement in its own process(es); `extra` goes into measure.py's spec (e.g. model_extra)."""
    out = workdir / (v.key.replace(" ", "_") + "_" + hashlib.md5(json.dumps(extra).encode()).hexdigest()[:8])
    peak, wall = _run_measure(_spec(v, a, out, extra), v.backend, v.key)
    files = sorted(workdir.glob(out.name + ".rank*.json"))
    ranks = [json.loads(p.read_text()) for p in files]
    for p in files:
        p.unlink()
    r0 = ranks[0]
    cuda = [r["cuda_max_allocated"] for r in ranks if r["cuda_max_allocated"] is not None]
    step_s = max(r["step_s"] for r in ranks)  # the step ends when the slowest rank does
    return {"step_s": step_s, "useful_tokens_per_s": r0["useful_tokens_per_step"] / step_s,
            "padding_share": 1 - r0["useful_tokens_per_step"] / r0["computed_tokens_per_step"],
            "peak_memory_bytes": sum(cuda) if cuda else peak, "memory_kind": "cuda_max_allocated" if cuda else "rss",
            "wall_s": wall}


def measure_shared(variants: list[Variant], a, workdir: Path) -> dict[str, dict]:
    """The variants in one process (single backend), one optimizer step each in turn, `a.shared_steps` measured
    rounds: per variant its step times (round k of every variant ran seconds apart) and useful tokens/s.
    Memory is not per variant here (one process holds them all): it comes from the variants' own runs."""
    out = workdir / "shared"
    spec = {**_spec(variants[0], a, out), "steps": a.shared_steps,
            "sides": [{"side": v.side, "method": v.method, "data": v.data, "packing": v.packing} for v in variants]}
    _, wall = _run_measure(spec, "single", "shared process")
    path = out.with_name(out.name + ".shared.json")
    sides = json.loads(path.read_text())["sides"]
    path.unlink()
    results = {}
    for v, r in zip(variants, sides):
        results[v.key] = r if "error" in r else {
            "step_s": r["step_s"], "step_times": r["step_times"],
            "useful_tokens_per_s": r["useful_tokens_per_step"] / r["step_s"], "wall_s": wall}
    return results


def ratio(c: Comparison, a: dict, b: dict) -> float:
    if c.metric == "speedup":
        return b["step_s"] / a["step_s"]
    if c.metric == "overhead":
        return a["step_s"] / b["step_s"] - 1
    return a["useful_tokens_per_s"] / b["useful_tokens_per_s"]


def shared_ratios(c: Comparison, shared: dict[str, dict]) -> list[float]:
    """One ratio per round of the shared process (step k of A against step k of B)."""
    a, b = shared[c.a.key], shared[c.b.key]
    if "error" in a or "error" in b:
        return []
    return [ratio(c, {"step_s": ta}, {"step_s": tb}) for ta, tb in zip(a["step_times"], b["step_times"])]


def spread(xs: list[float]) -> dict:
    if not xs:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def meets(c: Comparison) -> bool | None:
    if c.target is None or not c.ratios:
        return None
    op, bound = c.target
    m = statistics.median(c.ratios)
    return m >= bound if op == ">=" else m <= bound


def _fmt_ratio(c: Comparison) -> str:
    s = spread(c.ratios)
    if c.metric == "overhead":
        return f"{100 * s['median']:+.1f}% [{100 * s['min']:+.1f}, {100 * s['max']:+.1f}]"
    return f"{s['median']:.2f}x [{s['min']:.2f}, {s['max']:.2f}]"


def table(comps: list[Comparison], runs: dict[str, list[dict]], shared: dict[str, dict]) -> str:
    def med(c, key, name, scale=1.0, digits=0):
        timed = c.shared and name != "peak_memory_bytes"  # memory: from the variant's own process
        ok = [r[name] / scale for r in ([shared.get(key, {})] if timed else runs.get(key, [])) if name in r]
        return f"{statistics.median(ok):.{digits}f}" if ok else "failed"

    lines = ["| comparison | backend | A s/step | B s/step | ratio median [min, max] | target | met | "
             "A tok/s | B tok/s | A peak MB | B peak MB |", "|" + "---|" * 11]
    for c in comps:
        backend = f"{c.a.backend}, one process" if c.shared else c.a.backend
        times = f"{med(c, c.a.key, 'step_s', digits=3)} | {med(c, c.b.key, 'step_s', digits=3)}"
        if not c.ratios:
            lines.append(f"| {c.name} | {backend} | {times} | failed (see the JSON) |" + " |" * 6)
            continue
        ok = meets(c)
        target = "" if c.target is None else (f"{c.target[0]} {100 * c.target[1]:.0f}%" if c.metric == "overhead"
                                              else f"{c.target[0]} {c.target[1]:.1f}x")
        lines.append(f"| {c.name} | {backend} | {times} | {_fmt_ratio(c)} | {target} | "
                     f"{'' if ok is None else ('yes' if ok else '**no**')} | "
                     f"{med(c, c.a.key, 'useful_tokens_per_s')} | {med(c, c.b.key, 'useful_tokens_per_s')} | "
                     f"{med(c, c.a.key, 'peak_memory_bytes', 2**20)} | {med(c, c.b.key, 'peak_memory_bytes', 2**20)} |")
    return "\n".join(lines)


def update_readme(readme: Path, block: str) -> None:
    text = readme.read_text()
    head, _, rest = text.partition(README_START)
    _, _, tail = rest.partition(README_END)
    write_atomic(readme, f"{head}{README_START}\n{block}\n{README_END}{tail}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized: 2 rounds, 1 warm-up + 3 measured steps, "
                   "LoRA only on the 2-process backends")
    p.add_argument("--only", nargs="+", choices=list(METHODS), help="methods (default: all)")
    p.add_argument("--backends", nargs="+", choices=("single",) + DIST_BACKENDS, default=None)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch", type=int, default=None, help="per process (quick 4, else 8)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--long-max-length", type=int, default=None,
                   help="max_length of the mixed-length packing set (quick 256, else 512)")
    p.add_argument("--steps", type=int, default=None, help="measured steps per run (after warm-up)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None, help="rounds (each measures every variant once)")
    p.add_argument("--shared-steps", type=int, default=None,
                   help="measured steps per side in the one-process comparisons (quick 16, else 32)")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--eval", action="store_true", help=f"also run {EVAL_BENCH.name} (1 vs 2 processes evaluation)")
    p.add_argument("--update-readme", action="store_true", help="put the table into bench/README.md")
    a = p.parse_args(argv)
    quick_or_full = {"steps": (3, 8), "warmup": (1, 2), "repeats": (2, 3), "batch": (4, 8), "long_max_length": (256, 512),
                     "shared_steps": (16, 32)}
    for name, (quick, full) in quick_or_full.items():
        if getattr(a, name) is None:
            setattr(a, name, quick if a.quick else full)
    a.backends = a.backends or ["single", *DIST_BACKENDS]
    a.only = a.only or list(METHODS)
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    comps = plan(a.only, a.backends, a.quick)
    variants = list(dict.fromkeys(v for c in comps for v in (c.a, c.b)))
    # Variants that only a one-process comparison times are run on their own once, for their memory.
    timed = {v for c in comps if not c.shared for v in (c.a, c.b)}
    in_shared = list(dict.fromkeys(v for c in comps if c.shared for v in (c.a, c.b)))
    runs: dict[str, list[dict]] = {v.key: [] for v in variants}
    shared: dict[str, dict] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flexrank-bench-") as tmp:
        if in_shared:
            try:
                shared = measure_shared(in_shared, a, Path(tmp))
                said = ", ".join(f"{k}: {r.get('step_s', 0):.3f} s/step" if "error" not in r else f"{k}: {r['error']}"
                                 for k, r in shared.items())
            except RuntimeError as exc:
                shared, said = {v.key: {"error": str(exc)} for v in in_shared}, str(exc)
            print(f"[bench] one process, steps in turn: {said}", flush=True)
            for c in comps:
                if c.shared:
                    c.ratios = shared_ratios(c, shared)
        for round_ in range(a.repeats):
            order = variants if round_ % 2 == 0 else variants[::-1]
            for v in order:
                if round_ > 0 and v not in timed:
                    continue
                try:
                    runs[v.key].append(measure(v, a, Path(tmp)))
                    said = f"{runs[v.key][-1]['step_s']:.3f} s/step"
                except RuntimeError as exc:  # one failing variant must not cost the whole run: it is reported
                    runs[v.key].append({"error": str(exc)})
                    said = str(exc)
                print(f"[bench] round {round_ + 1}/{a.repeats} {v.key}: {said}", flush=True)
            for c in comps:
                if not c.shared and "error" not in runs[c.a.key][round_] and "error" not in runs[c.b.key][round_]:
                    c.ratios.append(ratio(c, runs[c.a.key][round_], runs[c.b.key][round_]))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    command = "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    now = datetime.datetime.now()
    header = (f"`{command.strip()}` on {now:%Y-%m-%d %H:%M}, {device}, model {a.model}, batch {a.batch} per process, "
              f"{a.warmup} warm-up + {a.steps} measured steps, {a.repeats} interleaved rounds of processes; rows "
              f"'one process': {len(in_shared)} sides in one process, {a.warmup} warm-up + {a.shared_steps} "
              "measured steps each, in turn, ratio per round of steps, memory from each side's own process; "
              f"{time.perf_counter() - started:.0f} s in all. A = the first side named, B = the second; speedup = "
              "B's step time / A's, overhead = A's / B's - 1, packing = A's useful tokens/s / B's; peak = "
              f"{'CUDA max allocated, summed over ranks' if torch.cuda.is_available() else 'RSS of the process tree'}.")
    text = header + "\n\n" + table(comps, runs, shared)
    result = {"command": command.strip(), "date": now.isoformat(timespec="seconds"), "device": device,
              "args": vars(a), "runs": runs, "shared": shared,
              "comparisons": [{"name": c.name, "a": c.a.key, "b": c.b.key, "metric": c.metric, "shared": c.shared,
                               "target": c.target, "met": meets(c), "ratios": c.ratios, **spread(c.ratios)}
                              for c in comps]}
    if a.eval:
        if EVAL_BENCH.exists():
            proc = subprocess.run([sys.executable, str(EVAL_BENCH)], capture_output=True, text=True)
            result["eval"] = proc.stdout
            text += "\n\nEvaluation, 1 vs 2 processes (bench/eval_time.py):\n\n" + proc.stdout
        else:
            print(f"[bench] --eval: {EVAL_BENCH} does not exist yet; skipped", flush=True)
    out = Path(a.out)
    stem = now.strftime("%Y-%m-%d_%H%M%S")
    write_atomic(out / f"{stem}.json", json.dumps(result, indent=1))
    write_atomic(out / f"{stem}.md", text + "\n")
    if a.update_readme:
        update_readme(HERE / "README.md", text)
    print(text)
    return result


if __name__ == "__main__":
    main()
