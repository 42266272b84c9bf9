"""The transformers internals flexrank relies on (the Trainer's private methods it overrides or calls, a model's
attention kernel) and the LR scheduler state keys it edits: the only module that uses either (tests/test_internals.py fails on a private override or a private state key anywhere
else). `private_api_problems()` checks each by behaviour, on a tiny model, and names the dependency and version
when an upgrade changes it.

- `CheckpointLoading` replaces the Trainer's model, optimizer and scheduler loading on resume (transformers 5:
  `_load_from_checkpoint` before accelerate.prepare, then DeepSpeed's engine.load_checkpoint / FSDP loading and
  the optimizer and scheduler files in `_prepare_for_training`), keeping the rest (trainer_state.json, RNG files,
  skipping the trained batches). No public hook does this: callbacks run after the loading.
- `save_checkpoint` writes checkpoint-<step> outside a save step (a run preempted during its evaluation after
  training keeps its trained state), as the Trainer's save step does (`_save_checkpoint`, then the on_save
  callbacks). No public method writes a resumable checkpoint.
- `attention_kernel` reads which attention implementation a loaded model runs (no public accessor).
- `loss_normalisation` says how `Trainer.compute_loss` normalised the labels' loss of a micro-batch (over the
  labelled items of the whole step, times the number of processes, or a micro-batch mean) and what `training_step`
  divides it by, so that in-place distillation normalises its term alike. Public attributes, but the rules
  combine the Trainer's and the models' loss code (no public accessor says which reduction a loss used).
- `filter_non_finite_loss` is the Trainer's `logging_nan_inf_filter` on the device: the Trainer's own filter reads
  every micro-batch's loss on the host (`torch.isnan(loss) or torch.isinf(loss)`), which on a GPU waits for the
  backward to finish before the optimizer step is queued. It uses the Trainer's logging accumulators
  (`_tr_loss`, `_globalstep_last_logged`).
- `rewind_scheduler` moves a scheduler (transformers' get_scheduler: a torch LambdaLR) to a saved position through
  its state dict keys `last_epoch` and `_step_count`.
"""

import math
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, get_scheduler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..controllers.base import LossNormalisation


class CheckpointLoading:
    """Trainer mixin: with `replaces_checkpoint_loading` set (before train()), the Trainer loads no model,
    optimizer or scheduler file of the checkpoint; `load_replaced_checkpoint(checkpoint)` is called instead, once
    the optimizer, the engine and the scheduler exist (every process)."""

    replaces_checkpoint_loading = False

    def load_replaced_checkpoint(self, checkpoint: Path) -> None:
        raise NotImplementedError

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self.replaces_checkpoint_loading:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        if not (self.replaces_checkpoint_loading and resume_from_checkpoint):
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        self.load_replaced_checkpoint(Path(resume_from_checkpoint))
        return model, train_dataloader


def save_checkpoint(trainer) -> Path:
    """checkpoint-<global step> now, with everything a save step writes: the Trainer's files, then the on_save
    callbacks (flexrank's portable state, controller state and completion manifest). Every process calls it."""
    trainer._save_checkpoint(trainer.model, None)
    trainer.control = trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)
    return Path(trainer.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"


def attention_kernel(model) -> str:
    """The attention implementation `model` runs ('sdpa', 'eager', 'flash_attention_2', ...)."""
    return model.config._attn_implementation


def loss_normalisation(trainer: Trainer, num_items_in_batch, logits: torch.Tensor) -> LossNormalisation:
    """How `trainer.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)` normalised the labels' loss
    it returned for a micro-batch whose model returned `logits`, in transformers 5:
    - the causal-LM loss (ForCausalLMLoss, token logits) sums the token losses and divides by num_items_in_batch
      when the model receives it (it does when it accepts loss kwargs); so does the LabelSmoother, and a
      compute_loss_func is handed it; sequence-classification losses average over the micro-batch (they ignore it);
    - with average_tokens_across_devices, compute_loss then multiplies by the number of processes (per tensor-parallel
      group; n_gpu under DataParallel);
    - training_step divides the loss by the gradient accumulation steps unless it counts as scaled for them."""
    args, given = trainer.args, num_items_in_batch is not None
    kwargs_path = trainer.model_accepts_loss_kwargs or trainer.compute_loss_func is not None
    if trainer.label_smoother is not None or trainer.compute_loss_func is not None:
        items = num_items_in_batch
    elif logits is not None and logits.dim() == 3 and trainer.model_accepts_loss_kwargs:
        items = num_items_in_batch
    else:
        items = None
    factor = 1
    if args.average_tokens_across_devices and kwargs_path and given:
        factor = trainer.accelerator.num_processes // trainer.get_tp_size() if args.n_gpu <= 1 else args.n_gpu
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is None:
        scaled = (trainer.model_accepts_loss_kwargs and given) or trainer.compute_loss_func is not None
    divisor = 1 if scaled else getattr(trainer, "current_gradient_accumulation_steps", args.gradient_accumulation_steps)
    return LossNormalisation(items=items, factor=factor, divisor=divisor)


def filter_non_finite_loss(trainer: Trainer, loss: torch.Tensor) -> torch.Tensor:
    """What the Trainer's logging_nan_inf_filter adds to its logged training loss for a micro-batch's `loss`, with no
    host read: the loss, or if it is NaN or infinite, the mean of what was added since the last logging step
    (transformers 5's loop: `_tr_loss += _tr_loss / (1 + global_step - _globalstep_last_logged)`). Only the logged
    value changes: the micro-batch's backward has already run. Outside the Trainer's loop (no accumulators yet): the
    loss as it is."""
    if getattr(trainer, "_tr_loss", None) is None:
        return loss
    filler = trainer._tr_loss / (1 + trainer.state.global_step - trainer._globalstep_last_logged)
    return torch.where(torch.isfinite(loss), loss, filler.to(loss.dtype))


def rewind_scheduler(scheduler, saved: dict) -> None:
    """Put `scheduler` at the position of its `saved` state dict; the per-group lists (base LRs) stay its own, as
    backends may hold different numbers of parameter groups (DeepSpeed drops empty ones). It is set one step
    back, then stepped, so every group's LR is its value at the saved position."""
    own = scheduler.state_dict()
    merged = {k: own.get(k, v) if isinstance(v, list) else v for k, v in saved.items()}
    merged["last_epoch"] -= 1
    merged["_step_count"] = merged.get("_step_count", 2) - 1
    scheduler.load_state_dict(merged)
    scheduler.step()


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, x, y):
        return {"loss": ((self.linear(x).squeeze(-1) - y) ** 2).mean()}


class _FirstStepWeight(TrainerCallback):
    def __init__(self, seen: dict):
        self.seen = seen

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.seen.setdefault("first_step_weight", model.linear.weight.detach().clone())


def _tiny_trainer(cls, out: str, callback: TrainerCallback, **saving) -> Trainer:
    """A `cls` Trainer of _Tiny on 8 fixed records: 2 steps of 4 on the CPU, printing nothing."""
    generator = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(2, generator=generator), "y": torch.randn((), generator=generator)} for _ in range(8)]
    args = TrainingArguments(out, max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                             disable_tqdm=True, logging_strategy="no", **saving)
    made = cls(model=_Tiny(), args=args, train_dataset=data, callbacks=[callback])
    made.remove_callback(PrinterCallback)
    return made


def _resume_problems() -> list[str]:
    """Train a tiny model 2 steps with a checkpoint each, then resume from the first with and without
    CheckpointLoading's replacement: what each loads, and when."""
    seen: dict = {}

    class Probe(CheckpointLoading, Trainer):
        def load_replaced_checkpoint(self, checkpoint: Path) -> None:
            seen.update(checkpoint=checkpoint, optimizer_state=len(self.optimizer.state),
                        scheduler_epoch=self.lr_scheduler.last_epoch, weight=self.model.linear.weight.detach().clone())

    def trainer(out: str, replace: bool, seed: int) -> Probe:
        torch.manual_seed(seed)  # the model's initial weights
        probe = _tiny_trainer(Probe, out, _FirstStepWeight(seen), save_steps=1)
        probe.replaces_checkpoint_loading = replace
        return probe

    problems = []
    with tempfile.TemporaryDirectory() as out:
        trainer(out, False, 0).train()
        ckpt = Path(out) / "checkpoint-1"
        saved = load_file(ckpt / "model.safetensors")["linear.weight"]
        replaced = trainer(out, True, 1)
        initial = replaced.model.linear.weight.detach().clone()
        seen.clear()
        replaced.train(resume_from_checkpoint=str(ckpt))
        if seen.get("checkpoint") != ckpt:
            problems.append("Trainer.train(resume_from_checkpoint) calls _prepare_for_training(max_steps, "
                            "train_dataloader, resume_from_checkpoint) once the optimizer and scheduler exist")
        elif seen["optimizer_state"] or seen["scheduler_epoch"] != 0 or not torch.equal(seen["weight"], initial):
            problems.append("the model is loaded by _load_from_checkpoint and the optimizer and scheduler by "
                            "_prepare_for_training (skipped, they were loaded anyway)")
        if replaced.state.global_step != 2 or not torch.equal(seen.get("first_step_weight"), initial):
            problems.append("a replaced loading still resumes the Trainer's state (global step) and loads no weights")
        seen.clear()
        trainer(out, False, 1).train(resume_from_checkpoint=str(ckpt))
        if "checkpoint" in seen or not torch.equal(seen.get("first_step_weight"), saved):
            problems.append("without the replacement the Trainer loads the checkpoint's model")
    return [f"transformers {version('transformers')}: {p} no longer holds (used by transformers_internals."
            f"CheckpointLoading)" for p in problems]


class _Saves(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_save(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def _save_problems() -> list[str]:
    """A 2-step run that saves nothing, then save_checkpoint: a complete checkpoint-2 that a run resumes from."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        def trainer() -> Trainer:
            return _tiny_trainer(Trainer, out, _Saves(), save_strategy="no")

        ran = trainer()
        ran.train()
        folder = save_checkpoint(ran)
        saves = next(c for c in ran.callback_handler.callbacks if isinstance(c, _Saves)).steps
        written = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
        resumed = trainer()
        resumed.train(resume_from_checkpoint=str(folder))
        same = torch.equal(resumed.model.linear.weight, ran.model.linear.weight)
    if saves != [2] or not {"trainer_state.json", "optimizer.pt", "scheduler.pt", "model.safetensors"} <= written \
            or resumed.state.global_step != 2 or not same:
        return [f"transformers {version('transformers')}: Trainer._save_checkpoint(model, trial) writes "
                f"checkpoint-<global_step> (model, optimizer, scheduler, trainer state) that a run resumes from, "
                f"and callback_handler.on_save runs the on_save callbacks no longer holds (used by "
                f"transformers_internals.save_checkpoint; seen: on_save at {saves}, files {sorted(written)})"]
    return []


def _attention_problems() -> list[str]:
    """A tiny Llama built with each CPU kernel reports that kernel."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=32)
    seen = {kernel: attention_kernel(AutoModelForCausalLM.from_config(config, attn_implementation=kernel))
            for kernel in ("eager", "sdpa")}
    if seen != {"eager": "eager", "sdpa": "sdpa"}:
        return [f"transformers {version('transformers')}: config._attn_implementation names the model's attention "
                f"kernel no longer holds (used by transformers_internals.attention_kernel; seen {seen})"]
    return []


def _scheduler_problems() -> list[str]:
    """A linear warm-up schedule stepped 3 times, and a fresh one rewound to its saved state: same position and LR."""
    def scheduler():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=10)

    ran = scheduler()
    for _ in range(3):
        ran.optimizer.step()
        ran.step()
    fresh = scheduler()
    rewind_scheduler(fresh, ran.state_dict())
    if fresh.last_epoch != ran.last_epoch or fresh.get_last_lr() != ran.get_last_lr():
        return [f"torch {version('torch')}: an LR scheduler's state dict keeps its position in last_epoch and "
                f"_step_count no longer holds (used by transformers_internals.rewind_scheduler)"]
    return []


def _normalisation_problems() -> list[str]:
    """A tiny causal LM and a tiny classifier, each with labels partly -100: Trainer.compute_loss equals the summed
    cross-entropy over the labelled items normalised as loss_normalisation says, with and without num_items_in_batch"""
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=32, num_labels=3, pad_token_id=0)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 32, (3, 6), generator=generator)
    cases = {"causal LM": (LlamaForCausalLM, ids.masked_fill(torch.rand(3, 6, generator=generator) < 0.3, -100)),
             "classifier": (LlamaForSequenceClassification, torch.tensor([2, -100, 0]))}
    seen = []
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, report_to=[], use_cpu=True, disable_tqdm=True)
        for name, (cls, labels) in cases.items():
            torch.manual_seed(0)
            trainer = Trainer(model=cls(config), args=args)
            with torch.no_grad():
                logits = trainer.model(input_ids=ids).logits.float()
                rows, targets = (logits[:, :-1].reshape(-1, 32), labels[:, 1:].reshape(-1)) if logits.dim() == 3 \
                    else (logits, labels)
                summed = F.cross_entropy(rows, targets, ignore_index=-100, reduction="sum")
                for items in (torch.tensor(40), None):
                    loss = trainer.compute_loss(trainer.model, {"input_ids": ids, "labels": labels},
                                                num_items_in_batch=items)
                    norm = loss_normalisation(trainer, items, logits)
                    expected = summed / (norm.items if norm.items is not None else targets.ne(-100).sum()) * norm.factor
                    if not torch.allclose(loss, expected, rtol=1e-5, atol=1e-6):
                        seen.append(f"{name} with num_items_in_batch={items}: loss {float(loss):.6f}, by the rule "
                                    f"{float(expected):.6f}")
    if seen:
        return [f"transformers {version('transformers')}: Trainer.compute_loss normalises the labels' loss as "
                f"loss_normalisation says no longer holds (used by in-place distillation; {'; '.join(seen)})"]
    return []


class _NonFiniteLoss(_Tiny):
    """_Tiny whose loss value is NaN at its third forward and infinite at its sixth (their gradients stay finite)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, y):
        self.calls += 1
        bad = {3: float("nan"), 6: float("inf")}.get(self.calls, 0.0)
        return {"loss": super().forward(x, y)["loss"] + bad}


def _loss_filter_problems() -> list[str]:
    """The same 8 steps with a NaN and an infinite loss, logged every 4 steps: the Trainer's own filter and
    filter_non_finite_loss (the Trainer's filter off) log the same losses."""
    class Filtered(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            return filter_non_finite_loss(self, super().training_step(model, inputs, num_items_in_batch))

    logged = []
    with tempfile.TemporaryDirectory() as out:
        for cls, own_filter in ((Trainer, True), (Filtered, False)):
            torch.manual_seed(0)
            data = [{"x": torch.randn(2), "y": torch.randn(())} for _ in range(8)]
            args = TrainingArguments(out, max_steps=8, per_device_train_batch_size=1, report_to=[], use_cpu=True,
                                     disable_tqdm=True, logging_steps=4, logging_nan_inf_filter=own_filter)
            trainer = cls(model=_NonFiniteLoss(), args=args, train_dataset=data)
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            logged.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    if len(logged[0]) != 2 or not all(math.isfinite(v) for v in logged[0]) or logged[0] != logged[1]:
        return [f"transformers {version('transformers')}: the Trainer's logging_nan_inf_filter adds _tr_loss / "
                f"(1 + global_step - _globalstep_last_logged) for a non-finite loss no longer holds (used by "
                f"transformers_internals.filter_non_finite_loss; logged {logged[0]} by the Trainer's filter, "
                f"{logged[1]} by flexrank's)"]
    return []


def private_api_problems() -> list[str]:
    """One line per internal above that no longer behaves as flexrank relies on (empty when all do)."""
    problems = []
    for check, dependency in ((_resume_problems, "transformers"), (_save_problems, "transformers"),
                              (_attention_problems, "transformers"), (_scheduler_problems, "torch"),
                              (_normalisation_problems, "transformers"), (_loss_filter_problems, "transformers")):
        try:
            problems += check()
        except Exception as exc:  # e.g. a renamed method: the check itself cannot run
            problems.append(f"{dependency} {version(dependency)}: {check.__doc__.split(':')[0].strip()} failed: "
                            f"{type(exc).__name__}: {exc}")
    return problems
