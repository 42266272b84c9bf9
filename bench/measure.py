"""One measurement, in its own process (or one of 2 launched ones): build one side, train `warmup + steps` optimizer
steps, write the timings as JSON.

Sides, on the same model, data, adapter settings and TrainingArguments:
- flexrank: what `flexrank train` builds (models.loading.load_base_model, the adapter method's build, FlexTrainer),
  in the same order as run._train;
- stock: what a user writes without flexrank (transformers.Trainer + peft.get_peft_model), see stock.py.

    python bench/measure.py '<spec JSON>'      (bench/run.py builds the spec and the launch command)

With "profile": N in the spec, the run goes under torch.profiler and the N costliest operators (self CPU time)
are written to <out>.profile.txt (how the overhead notes in bench/README.md were made).

With "sides": [{side, method, data, packing, ...}, ...] the sides share this one process (single backend): each is
built in turn, then they train one optimizer step each in turn, A B C B C A C A B ... (Turns), so that machine
noise and drift fall on every side alike and round k's steps ran seconds apart. Timings go to <out>.shared.json.
This is how small differences (a controller's few percent over LoRA) are measured: between processes, step times
on this 2-core machine differ by 5-15% with nothing else running.

The sides step through the same batches (same data, seed and sampler), and a first sight of a batch shape can
cost far more than the step (on a GPU, cuDNN's attention builds a plan per new shape: ~0.15 s against a 0.3 s step,
reference/gpu.md). Taken in turn, only the side that ran first in a round would pay it. So each round has two
passes in the same rotated order (spec "warm", default true): every side first runs an untimed forward + backward
of its batch (no optimizer step, gradients dropped), then every side takes its timed step. No timed step meets a
new shape; what a new shape costs shows in the warm passes of the side that met it first ("warm_times",
"warm_led").
"""

import json
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

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
from flexrank.training.transformers_internals import attention_kernel  # noqa: E402

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
    """The recipe of one side; "model_extra" / "training_extra" add to (and win over) its model / training
    sections, e.g. {"dtype": "bfloat16", "attn_implementation": "sdpa"} / {"bf16": true}."""
    m = METHODS[spec["method"]]
    # data "mixed": the records come from corpus.py (train_set); the task is then only a placeholder
    data = {"task": "analogy", "train_size": 2048}
    raw = {"model": {"name_or_path": spec["model"], **m.get("model", {}), **spec.get("model_extra", {})},
           "data": {**data, "max_length": spec["max_length"], "packing": spec["packing"]},
           "adapter": m["adapter"],
           "training": {"output_dir": spec["out"] + ".run", "per_device_train_batch_size": spec["batch"],
                        "max_steps": spec["warmup"] + spec["steps"], "warmup_steps": 0, "logging_steps": 10 ** 6,
                        "report_to": [], "save_strategy": "no", "disable_tqdm": True, "seed": 0,
                        **spec.get("training_extra", {})}}
    return load_config(raw=raw)


_TRAIN_SETS: dict[str, data_lib.TokenizedDataset] = {}  # sides of one process with the same data share it


def train_set(cfg, tokenizer, spec: dict) -> data_lib.TokenizedDataset:
    key = json.dumps([spec["model"], spec["data"], spec["batch"], spec["warmup"], spec["steps"], spec["max_length"]])
    if key not in _TRAIN_SETS:
        if spec["data"] == "mixed":
            records = corpus.mixed_records(spec["batch"] * (spec["warmup"] + spec["steps"]) * 2, seed=0)
            _TRAIN_SETS[key] = tokenize(cfg, tokenizer, records, "text")
        else:
            _TRAIN_SETS[key] = tokenize_train(cfg, tokenizer, load_data(cfg)).dataset
    return _TRAIN_SETS[key]


def _sync() -> None:
    """CUDA runs asynchronously: a step's kernels must have finished before its end is timed (and before the next
    side's turn, or its queued work would be timed as the next side's)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepClock(TrainerCallback):
    """Wall time from one step's start to the next one's (so the controller's hooks, the optimizer and the data
    loading all count), and the last step to its end."""

    def __init__(self):
        self.starts, self.end = [], None

    def on_step_begin(self, args, state, control, **kw):
        _sync()
        self.starts.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kw):
        _sync()
        self.end = time.perf_counter()

    def step_times(self) -> list[float]:
        marks = self.starts + [self.end]
        return [b - a for a, b in zip(marks, marks[1:])]


class CountingCollator:
    """Wraps a collator and counts the tokens of every batch it builds: useful (the examples' own tokens),
    computed (the batch tensor's size, padding included) and attended (the sum of squared example lengths: each
    token attends over its own example, so attended / useful is the mean attention span of a token, the S of
    flops.py)."""

    def __init__(self, inner):
        self.inner, self.useful, self.computed, self.attended = inner, [], [], []

    def __call__(self, features, *args, **kwargs):
        batch = self.inner(features, *args, **kwargs)
        self.useful.append(sum(len(f["input_ids"]) for f in features))
        self.computed.append(batch["input_ids"].numel())
        self.attended.append(sum(len(f["input_ids"]) ** 2 for f in features))
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
    after the same neighbour. With warm=True a round is two passes in that order, a warm pass (every side's
    untimed forward + backward of its batch) then the timed steps: A B C A B C, B C A B C A, ... (TurnClock).
    `log` lists every turn given as (round, pass, side), pass 0 the warm pass (with warm) or the steps."""

    def __init__(self, sides: int, warm: bool = False):
        self.cond, self.current, self.done = threading.Condition(), 0, [False] * sides
        self.passes = 2 if warm else 1
        # the round being run, and the current turn's place in it (pass * sides + place in the round's order)
        self.round, self.position = 0, 0
        self.log = [(0, 0, 0)]

    @property
    def warm(self) -> bool:
        return self.passes == 2

    def order(self) -> list[int]:
        sides = len(self.done)
        return [(self.round + k) % sides for k in range(sides)]

    def first_of_round(self) -> bool:
        """Whether the current turn is its round's first (with warm: the side that meets the round's batch first)."""
        with self.cond:
            return len(self.log) == 1 or self.log[-2][0] != self.log[-1][0]

    def wait(self, index: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.current == index)

    def hand_over(self, index: int, finished: bool = False) -> None:
        with self.cond:
            self.done[index] = self.done[index] or finished
            if not all(self.done):
                sides = len(self.done)
                while True:  # the next side that has not finished, in this round's order or the next round's
                    self.position += 1
                    if self.position == self.passes * sides:
                        self.round, self.position = self.round + 1, 0
                    if not self.done[self.order()[self.position % sides]]:
                        break
                self.current = self.order()[self.position % sides]
                self.log.append((self.round, self.position // sides, self.current))
            self.cond.notify_all()


class TurnClock(StepClock):
    """StepClock for a trainer sharing the process: between two of its steps it hands over to the next side and
    waits for its turn again, outside the timed interval (which, as StepClock's, runs from one step's start to the
    next one's: data loading and the controller's hooks count). With warm turns, `warm()` (the untimed forward +
    backward of the step's batch) runs in the side's warm turn, before its timed turn of the same round.
    On CUDA it also keeps the most memory a step allocated on top of what was allocated when it began."""

    def __init__(self, turns: Turns, index: int, warm=None):
        super().__init__()
        self.turns, self.index, self.warm, self.mark, self.times = turns, index, warm, None, []
        self.warm_times, self.warm_led = [], []  # each warm pass's seconds, and whether it met the batch first
        self.step_extra_bytes, self._allocated = 0, 0

    def on_step_begin(self, args, state, control, **kw):
        if self.mark is not None:
            _sync()
            self.times.append(time.perf_counter() - self.mark)
            self.turns.hand_over(self.index)
            self.turns.wait(self.index)
        if self.turns.warm:
            led, start = self.turns.first_of_round(), time.perf_counter()
            self.warm()
            _sync()
            self.warm_times.append(time.perf_counter() - start)
            self.warm_led.append(led)
            self.turns.hand_over(self.index)
            self.turns.wait(self.index)
        if torch.cuda.is_available():
            self._allocated = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        self.mark = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        super().on_step_end(args, state, control, **kw)
        if torch.cuda.is_available():
            self.step_extra_bytes = max(self.step_extra_bytes, torch.cuda.max_memory_allocated() - self._allocated)

    def step_times(self) -> list[float]:
        return self.times + [self.end - self.mark]


def warm_pass(trainer):
    """The warm pass of a side: the Trainer's own forward + backward (Trainer.training_step: its autocast, loss,
    and a flexrank controller's extra loss) of the batch the Trainer has just fetched for its next step, then the
    gradients dropped; no optimizer step, so training goes on as if it had not run. (Trainer.training_step, not a
    FlexTrainer's: a controller's per-step passes and loss records stay those of the real step.)"""
    held = {}
    fetch = trainer.get_batch_samples

    def get_batch_samples(*args, **kwargs):  # the Trainer fetches a step's batches before on_step_begin
        batches, num_items = fetch(*args, **kwargs)
        held["batch"], held["num_items"] = batches[0], num_items
        return batches, num_items

    trainer.get_batch_samples = get_batch_samples

    def warm() -> None:
        model = trainer.model_wrapped
        Trainer.training_step(trainer, model, held["batch"], held["num_items"])
        model.zero_grad(set_to_none=True)

    return warm


def resident_bytes(trainer) -> int:
    """CUDA memory a side holds between steps: its model's parameters and buffers and its optimizer's state
    (each storage once). With the most its steps allocated on top (TurnClock), it stands in for the peak memory
    of a process of its own, which a process shared by several sides cannot measure."""
    tensors = list(trainer.model.parameters()) + list(trainer.model.buffers())
    if trainer.optimizer is not None:
        tensors += [v for state in trainer.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.is_cuda}
    return sum(storages.values())


def side_info(trainer) -> dict:
    """What really ran: the attention kernel transformers was given, the frozen weights' dtype, autocast."""
    model = trainer.model
    frozen = next((p for p in model.parameters() if not p.requires_grad and p.is_floating_point()), None)
    return {"attn_implementation": attention_kernel(model),
            "weights_dtype": str(frozen.dtype).removeprefix("torch.") if frozen is not None else None,
            "autocast": "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else None,
            "liger": bool(trainer.args.use_liger_kernel),
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def result_of(spec: dict, clock: StepClock, collator: CountingCollator) -> dict:
    times = clock.step_times()[spec["warmup"]:]
    world = env.world_size()
    # the batches of the measured steps (one batch per step; accelerate may have collated one more ahead)
    measured = slice(spec["warmup"], spec["warmup"] + len(times)) if len(collator.useful) >= spec["warmup"] + len(
        times) else slice(None)
    useful, attended = collator.useful[measured], collator.attended[measured]
    return {
        "step_s": statistics.median(times), "step_times": times,
        # Tokens per step over all processes: this rank's mean per batch times the world size.
        "useful_tokens_per_step": world * statistics.mean(useful),
        "useful_tokens_min": world * min(useful),
        "computed_tokens_per_step": world * statistics.mean(collator.computed[measured]),
        "attention_span": sum(attended) / sum(useful),
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
    built, errors = [], {}
    for number, side in enumerate(spec["sides"]):
        side_spec = {**spec, **side}
        torch.manual_seed(0)  # each side starts as it would in a process of its own
        clock = StepClock()  # replaced by its TurnClock below, once the sides that built are known
        try:
            trainer, collator = build(side_spec, run_config(side_spec), clock)
        except Exception as exc:  # e.g. a kernel missing here: reported for this side; the others go on
            errors[number] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            continue
        built.append((number, side_spec, trainer, collator))
    turns = Turns(len(built), warm=spec.get("warm", True))
    sides = []
    for index, (number, side_spec, trainer, collator) in enumerate(built):
        clock = TurnClock(turns, index, warm_pass(trainer) if turns.warm else None)
        trainer.callback_handler.pop_callback(StepClock)
        trainer.add_callback(clock)
        sides.append((side_spec, trainer, clock, collator))

    run_errors: dict[int, str] = {}

    def train(index: int, trainer) -> None:
        turns.wait(index)  # set-up and first step of each side in turn too
        try:
            trainer.train()
        except Exception as exc:  # reported for this side; the others go on
            run_errors[index] = f"{type(exc).__name__}: {exc}"
        finally:
            turns.hand_over(index, finished=True)

    threads = [threading.Thread(target=train, args=(i, t)) for i, (_, t, _, _) in enumerate(sides)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out = {number: {"error": message} for number, message in errors.items()}
    for index, ((number, *_), (side_spec, trainer, clock, collator)) in enumerate(zip(built, sides)):
        if index in run_errors:
            out[number] = {"error": run_errors[index]}
            continue
        out[number] = {**result_of(side_spec, clock, collator), **side_info(trainer),
                       "warm_times": clock.warm_times[side_spec["warmup"]:],
                       "warm_led": clock.warm_led[side_spec["warmup"]:]}
        if torch.cuda.is_available():  # per side: what it holds plus what its steps added (see resident_bytes)
            out[number]["cuda_max_allocated"] = resident_bytes(trainer) + clock.step_extra_bytes
    write_atomic(f"{spec['out']}.shared.json", json.dumps(
        {"sides": [out[i] for i in range(len(spec["sides"]))], "warm": turns.warm, "turns": turns.log}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
    if env.in_launched_process():
        exit_distributed()  # as `flexrank train` does: gloo processes sometimes abort in interpreter teardown
