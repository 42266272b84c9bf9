"""One training run end to end, as a straight script: data, model, adapter method, metrics before/after, outputs.
Every method-specific step is a call on the method object (adapters/method.py); nothing here branches on it.

Output folder: config.yaml (resolved), metrics.json, the method's model (adapter/, or int4_model/ for nncf runs),
supernet/ (rank methods), sparse_base/ (the Wanda-pruned base, Shears), runs/ TensorBoard logs, checkpoints as the
training arguments say.
"""

import contextlib
import json
from pathlib import Path

from transformers import set_seed

from .adapters.registry import SPARSE_BASE, method_for
from .checkpoints.preemption import Preempted, PreemptionCallback
from .config import RunConfig, dump_config
from .data import records as data_lib
from .data.pipeline import load_data, tokenize, tokenize_train
from .distributed import env
from .distributed.backends import apply_cpu_shims, backend_of, full_state_dict, zero3_init_as_configured
from .evaluation.metrics import evaluate_run, summary_line
from .evaluation.scoring import evaluate_loss
from .evaluation.sharding import current_shard
from .io import output_folder, refuse_foreign, write_atomic, write_json
from .models.loading import count_parameters, load_base_model, load_tokenizer
from .training.arguments import resume_point, step_plan, training_arguments
from .training.trainer import FlexTrainer
from .training.transformers_internals import save_checkpoint

BEFORE_FILE = "before_metrics.json"  # the before-training evaluation, reused when the run resumes


def train(cfg: RunConfig) -> dict:
    preemption = PreemptionCallback()  # SIGTERM/SIGUSR1 from here on: checkpoint at a step boundary, then stop
    try:
        return _train(cfg, preemption)
    finally:
        preemption.restore_handlers()


def _train(cfg: RunConfig, preemption: PreemptionCallback) -> dict:
    out = Path(cfg.training["output_dir"])
    method = method_for(cfg)
    for folder in method.output_folders + ((SPARSE_BASE,) if cfg.adapter.sparsity else ()):
        refuse_foreign(out / folder, "training.output_dir")  # before any work: replaced when the run ends
    apply_cpu_shims()
    resume = resume_point(cfg, out)
    args = training_arguments(cfg, resume.overrides)  # validates the training section before anything heavy
    cfg = cfg.model_copy(update={"training": {**cfg.training, **resume.overrides}})  # what config.yaml records
    cfg.training.pop("resume_from_checkpoint", None)
    set_seed(args.seed)
    tokenizer = load_tokenizer(cfg.model)
    run_data = load_data(cfg)
    with args.main_process_first(desc="tokenizing"):  # the main process tokenizes; the others load its cache
        train_tokens = tokenize_train(cfg, tokenizer, run_data, contextlib.nullcontext)
        eval_set = tokenize(cfg, tokenizer, run_data.eval, run_data.kind, run_data.eval_key, contextlib.nullcontext)
    train_set = train_tokens.dataset
    collator = data_lib.make_collator(tokenizer, cfg.data.packing)
    eval_collator = data_lib.make_collator(tokenizer, False)
    main = env.is_main_process()
    if main:
        print(f"[flexrank] data: {len(train_set)} train / {len(eval_set)} held-out records ({run_data.kind})")

    def evaluate(model) -> dict:
        return evaluate_run(cfg, model, tokenizer, run_data, eval_set, eval_collator)

    with zero3_init_as_configured(args):
        model = load_base_model(cfg.model, tokenizer, packing=cfg.data.packing)
    metrics: dict = {"data": {"train": len(train_set), "eval": len(eval_set)},
                     "truncation": {k: train_tokens.stats[k] for k in ("truncated", "dropped")}}
    if cfg.adapter.sparsity:
        n = min(cfg.adapter.sparsity.calibration_samples, len(train_set))
        metrics["sparsity"] = _sparsify(cfg, model, tokenizer, eval_collator([train_set[i] for i in range(n)]), out)
    def sample(n: int = 1, start: int = 0):  # training records start.. start+n-1 as one batch (None past the end)
        records = [train_set[i] for i in range(start, min(start + n, len(train_set)))]
        return eval_collator(records) if records else None

    method.resume_from = resume.checkpoint
    method.build(model, step_plan(args, len(train_set)), sample)
    metrics["parameters"] = count_parameters(method.model)

    if cfg.eval.before:
        metrics["before"] = _before_training(out, resume.checkpoint is not None, cfg.eval.model_dump(),
                                             lambda: evaluate(method.model), main)
        if main:
            print(f"[flexrank] before training: {summary_line(metrics['before'])}")
    trainer = FlexTrainer(model=method.model, args=args, train_dataset=train_set, data_collator=collator,
                          controller=method.controller)
    for callback in method.callbacks(lambda: evaluate_loss(method.model, eval_set, eval_collator,
                                                           batch_size=cfg.eval.batch_size, shard=current_shard()),
                                     metrics):
        trainer.add_callback(callback)
    trainer.add_callback(preemption)
    try:
        result = trainer.train(resume_from_checkpoint=str(resume.checkpoint) if resume.checkpoint else None)
    except Preempted as stop:  # during an evaluation within training (SoRA's stage losses)
        raise _keep_trained_state(trainer, stop) from None
    if preemption.stopped_at is not None:  # a checkpoint, but no metrics/adapter as if the run had finished
        step = preemption.stopped_at
        raise Preempted(preemption.signum, f"after step {step}; checkpoint-{step} saved, continue with --resume auto")
    metrics["train"] = {**result.metrics, "backend": backend_of(trainer),
                        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
                        "world_size": args.world_size,
                        "resumed_from": str(resume.checkpoint) if resume.checkpoint else None}
    full_state = full_state_dict(trainer)  # gathered from ZeRO-3 / FSDP2 shards; a collective
    if main:
        method.save_trained_state(out, full_state)
    try:
        metrics.update(method.evaluate_after(evaluate, main))
    except Preempted as stop:
        raise _keep_trained_state(trainer, stop) from None
    if main:
        method.save(out, full_state, tokenizer, metrics)
    trainer.accelerator.wait_for_everyone()
    if not main:
        return metrics
    if metrics.get("after"):
        print(f"[flexrank] after training: {summary_line(metrics['after'])}")
    write_atomic(out / "config.yaml", dump_config(cfg))
    write_json(out / "metrics.json", metrics)
    print(f"[flexrank] wrote {out}/{method.model_dir}, {out}/metrics.json, {out}/config.yaml")
    return metrics


def _before_training(out: Path, resuming: bool, eval_settings: dict, evaluate, main: bool) -> dict:
    """The before-training metrics: evaluated once per run, kept in the run folder, so a resumed run with the same
    eval settings (e.g. one preempted during its evaluation after training) does not evaluate them again."""
    kept, settings = out / BEFORE_FILE, json.loads(json.dumps(eval_settings, default=str))
    if resuming and kept.is_file() and (saved := json.loads(kept.read_text()))["eval"] == settings:
        return saved["metrics"]
    metrics = evaluate()
    if main:
        write_json(kept, {"eval": settings, "metrics": metrics})
    return metrics


def _keep_trained_state(trainer, stop: Preempted) -> Preempted:
    """A signal during an evaluation after some training: checkpoint the trained state now (every process), so
    the requeued job redoes only the interrupted evaluation."""
    folder = save_checkpoint(trainer)
    return Preempted(stop.signum, f"during an evaluation at step {trainer.state.global_step}; {folder.name} saved, "
                     "continue with --resume auto (only the interrupted evaluation is redone)")


def _sparsify(cfg: RunConfig, model, tokenizer, calibration: dict, out: Path) -> dict:
    """Shears: Wanda-prune the base before the adapter is added, and keep the pruned base (the adapter belongs to
    it, for export and serving)."""
    from .adapters.sparsity import wanda_prune

    report = wanda_prune(model, [calibration], cfg.adapter.sparsity.ratio)
    report.pop("per_module", None)
    print(f"[flexrank] Wanda: base sparsity {report['ratio_achieved']:.4f}")
    if env.is_main_process():
        with output_folder(out / SPARSE_BASE, "training.output_dir") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return report
