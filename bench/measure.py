"""One measurement, in its own process (or one of 2 launched ones): build one side, train `warmup + steps` optimizer
steps, write the timings as JSON.

Sides, on the same model, data, adapter settings and TrainingArguments:
- flexrank: what `flexrank train` builds (models.loading.load_base_model, the adapter method's build, FlexTrainer),
  in the same order as run._train;
- stock: what a user writes without flexrank (transformers.Trainer + peft.get_peft_model), see stock.py.

    python bench/measure.py '<spec JSON>'      (bench/run.py builds the spec and the launch command)

With "profile": N in the spec, the run goes under torch.profiler and the N costliest operators (self CPU time)
are written to <out>.profile.txt (how the overhead notes in bench/README.md were made).

With "sides": [{side, method, data, packing}, ...] the sides share this one process (single backend): each is
built in turn, then they train one optimizer step each in turn, A B C B C A C A B ... (Turns), so that machine
noise and drift fall on every side alike and round k's steps ran seconds apart. Timings go to <out>.shared.json.
This is how small differences (a controller's few percent over LoRA) are measured: between processes, step times
on this 2-core machine differ by 5-15% with nothing else running.
"""

import json
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402  (bench/ is not a package)
import stock  # noqa: E402

from flexrank.distributed import env  # noqa: E402
from flexrank.launcher.launch import exit_distributed  # noqa: E402
from flexrank.data import records as data_lib  # noqa: E402
from flexrank.io import write_atomic  # noqa: E402
from flexrank.distributed.backends import apply_cpu_shims, zero3_init_as_configured  # noqa: E402
from flexrank.config import load_config  # noqa: E402
from flexrank.training.trainer import FlexTrainer  # noqa: E402
from flexrank.models.loading import load_base_model, load_tokenizer  # noqa: E402
from flexrank.adapters.registry import method_for  # noqa: E402
from flexrank.data.pipeline import load_data, tokenize, tokenize_train  # noqa: E402
from flexrank.training.arguments import step_plan, training_arguments  # noqa: E402

# Adapter settings per method (flexrank recipe form; stock.py writes the same ones in peft's form). r=8, all linear
# layers everywhere, so that the controllers' overhead is measured on the same adapter shapes as plain LoRA.
LORA = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}
METHODS = {
    "lora": {"adapter": {"method": "lora", **LORA}},
    "dora": {"adapter": {"method": "dora", **LORA}},
    "qlora": {"adapter": {"method": "lora", **LORA},
              "model": {"quantization": {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                                         "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "bfloat16"}}},
    # AdaLoRA's schedule is squeezed into the short run (allocation every step from step 1): the worst case.
    "adalora": {"adapter": {"method": "adalora", **LORA,
                            "adalora": {"target_r": 4, "tinit": 1, "tfinal": 1, "deltaT": 1}}},
    "elastic": {"adapter": {"method": "elastic", **LORA, "elastic": {"search_space": {
        "groups": [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]],
        "widths": [8, 6, 4], "per_layer": True}}}},
    "sora": {"adapter": {"method": "sora", **LORA, "sora": {"sparse_lambda": 1e-3, "threshold": 5e-3}}},
    "nncf_int4": {"adapter": {"method": "lora", **LORA},
                  "model": {"quantization": {"method": "nncf_int4", "mode": "int4_asym", "group_size": 64,
                                             "backup": "none"}}},
    # Elastic base widths (issue 14, i14a) go here once the recipe form exists, e.g.
    # "elastic_base": {"adapter": {"method": "elastic", **LORA, "elastic": {"search_space": ..., "base_widths": ...}}},
}


def run_config(spec: dict):
    m = METHODS[spec["method"]]
    # data "mixed": the records come from corpus.py (train_set); the task is then only a placeholder
    data = {"task": "analogy", "train_size": 2048}
    raw = {"model": {"name_or_path": spec["model"], **m.get("model", {}), **spec.get("model_extra", {})},
           "data": {**data, "max_length": spec["max_length"], "packing": spec["packing"]},
           "adapter": m["adapter"],
           "training": {"output_dir": spec["out"] + ".run", "per_device_train_batch_size": spec["batch"],
                        "max_steps": spec["warmup"] + spec["steps"], "warmup_steps": 0, "logging_steps": 10 ** 6,
                        "report_to": [], "save_strategy": "no", "disable_tqdm": True, "seed": 0}}
    return load_config(raw=raw)


def train_set(cfg, tokenizer, spec: dict) -> data_lib.TokenizedDataset:
    if spec["data"] == "mixed":
        records = corpus.mixed_records(spec["batch"] * (spec["warmup"] + spec["steps"]) * 2, seed=0)
        return tokenize(cfg, tokenizer, records, "text")
    return tokenize_train(cfg, tokenizer, load_data(cfg)).dataset


class StepClock(TrainerCallback):
    """Wall time from one step's start to the next one's (so the controller's hooks, the optimizer and the data
    loading all count), and the last step to its end."""

    def __init__(self):
        self.starts, self.end = [], None

    def on_step_begin(self, args, state, control, **kw):
        self.starts.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kw):
        self.end = time.perf_counter()

    def step_times(self) -> list[float]:
        marks = self.starts + [self.end]
        return [b - a for a, b in zip(marks, marks[1:])]


class CountingCollator:
    """Wraps a collator and counts the tokens of every batch it builds: useful (the examples' own tokens) and
    computed (the batch tensor's size, padding included)."""

    def __init__(self, inner):
        self.inner, self.useful, self.computed = inner, [], []

    def __call__(self, features, *args, **kwargs):
        batch = self.inner(features, *args, **kwargs)
        self.useful.append(sum(len(f["input_ids"]) for f in features))
        self.computed.append(batch["input_ids"].numel())
        return batch


def build(spec: dict, cfg, clock: StepClock):
    """The trainer for one side, and its counting collator."""
    tokenizer = load_tokenizer(cfg.model)
    dataset = train_set(cfg, tokenizer, spec)
    if spec["side"] == "stock":
        return stock.trainer(spec, cfg, tokenizer, dataset, clock, CountingCollator)
    args = training_arguments(cfg)
    collator = CountingCollator(data_lib.make_collator(tokenizer, cfg.data.packing))
    with zero3_init_as_configured(args):
        model = load_base_model(cfg.model, tokenizer, log=lambda *_: None, packing=cfg.data.packing)
    method = method_for(cfg)  # as flexrank train builds it (nncf_int4 included)
    method.build(model, step_plan(args, len(dataset)), lambda: data_lib.make_collator(tokenizer, False)([dataset[0]]))
    trainer = FlexTrainer(model=method.model, args=args, train_dataset=dataset, data_collator=collator,
                          controller=method.controller, callbacks=[clock])
    return trainer, collator


class Turns:
    """One optimizer step each, in turn, for trainers sharing this process; a finished side is skipped. Each round
    starts one side later than the one before (A B C, B C A, C A B, ...), so no side always runs first or right
    after the same neighbour."""

    def __init__(self, sides: int):
        self.cond, self.current, self.done = threading.Condition(), 0, [False] * sides
        self.round, self.position = 0, 0  # the round being run, and the current side's place in its order

    def order(self) -> list[int]:
        sides = len(self.done)
        return [(self.round + k) % sides for k in range(sides)]

    def wait(self, index: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.current == index)

    def hand_over(self, index: int, finished: bool = False) -> None:
        with self.cond:
            self.done[index] = self.done[index] or finished
            if not all(self.done):
                while True:  # the next side that has not finished, in this round's order or the next round's
                    self.position += 1
                    if self.position == len(self.done):
                        self.round, self.position = self.round + 1, 0
                    if not self.done[self.order()[self.position]]:
                        break
                self.current = self.order()[self.position]
            self.cond.notify_all()


class TurnClock(StepClock):
    """StepClock for a trainer sharing the process: between two of its steps it hands over to the next side and
    waits for its turn again, outside the timed interval (which, as StepClock's, runs from one step's start to the
    next one's: data loading and the controller's hooks count)."""

    def __init__(self, turns: Turns, index: int):
        super().__init__()
        self.turns, self.index, self.mark, self.times = turns, index, None, []

    def on_step_begin(self, args, state, control, **kw):
        if self.mark is not None:
            self.times.append(time.perf_counter() - self.mark)
            self.turns.hand_over(self.index)
            self.turns.wait(self.index)
        self.mark = time.perf_counter()

    def step_times(self) -> list[float]:
        return self.times + [self.end - self.mark]


def result_of(spec: dict, clock: StepClock, collator: CountingCollator) -> dict:
    times = clock.step_times()[spec["warmup"]:]
    world = env.world_size()
    return {
        "step_s": statistics.median(times), "step_times": times,
        # Tokens per step over all processes: this rank's mean per batch times the world size.
        "useful_tokens_per_step": world * statistics.mean(collator.useful),
        "computed_tokens_per_step": world * statistics.mean(collator.computed),
        "cuda_max_allocated": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "self_max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "world_size": world,
    }


def main(spec: dict) -> None:
    apply_cpu_shims()  # both sides: without it accelerate runs no real multi-process backend on a CPU machine
    if "sides" in spec:
        return main_shared(spec)
    torch.manual_seed(0)
    cfg = run_config(spec)
    clock = StepClock()
    trainer, collator = build(spec, cfg, clock)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if spec.get("profile"):  # torch.profiler's operator table of the whole run, beside the result
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            trainer.train()
        Path(f"{spec['out']}.profile.txt").write_text(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=int(spec["profile"])))
    else:
        trainer.train()
    rank = env.rank()
    write_atomic(f"{spec['out']}.rank{rank}.json", json.dumps(result_of(spec, clock, collator)))


def main_shared(spec: dict) -> None:
    turns = Turns(len(spec["sides"]))
    sides = []
    for index, side in enumerate(spec["sides"]):
        side_spec = {**spec, **side}
        torch.manual_seed(0)  # each side starts as it would in a process of its own
        clock = TurnClock(turns, index)
        trainer, collator = build(side_spec, run_config(side_spec), clock)
        sides.append((side_spec, trainer, clock, collator))
    errors: dict[int, str] = {}

    def train(index: int, trainer) -> None:
        turns.wait(index)  # set-up and first step of each side in turn too
        try:
            trainer.train()
        except Exception as exc:  # reported for this side; the others go on
            errors[index] = f"{type(exc).__name__}: {exc}"
        finally:
            turns.hand_over(index, finished=True)

    threads = [threading.Thread(target=train, args=(i, t)) for i, (_, t, _, _) in enumerate(sides)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out = {}
    for index, (side_spec, _, clock, collator) in enumerate(sides):
        out[index] = {"error": errors[index]} if index in errors else result_of(side_spec, clock, collator)
    write_atomic(f"{spec['out']}.shared.json", json.dumps({"sides": [out[i] for i in range(len(sides))]}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
    if env.in_launched_process():
        exit_distributed()  # as `flexrank train` does: gloo processes sometimes abort in interpreter teardown
