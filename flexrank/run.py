"""One training run end to end: data, model, adapter, controller, metrics before/after, outputs.

Output folder: config.yaml (resolved), metrics.json, adapter/ (plain peft), supernet/ (rank methods),
sparse_base/ (the Wanda-pruned base, Shears), runs/ TensorBoard logs, checkpoints as the training arguments say.
"""

import contextlib
import itertools
import json
import math
import os
import time
from pathlib import Path

import torch
from peft import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import TrainerCallback, TrainingArguments, set_seed

from .checkpoints import manifest as checkpoints
from .adapters import nncf as quant_nncf
from .io import atomic_path, write_atomic
from .data import records as data_lib
from .distributed.backends import apply_cpu_shims, backend_of, full_state_dict, zero3_init_as_configured
from .config import RunConfig, dump_config, load_config
from .data.pipeline import RunData, load_data, tokenize, tokenize_train  # noqa: F401 (the CLI and search use them)
from .controllers import AdaLoRAController, ElasticController, RankController, SoRAController
from .errors import ConfigError
from .evaluation import metrics as eval_metrics
from .evaluation.metrics import evaluate_classifier
from .evaluation.sharding import current_shard
from .evaluation.scoring import evaluate_loss
from .adapters.export import NothingToExport, export_plain_adapter
from .training.trainer import STATE_FILE, FlexTrainer, write_json
from .models.kernels import choose_liger
from .models.loading import RANK_METHODS, apply_adapter, count_parameters, load_base_model, load_tokenizer
from .checkpoints.preemption import Preempted, PreemptionCallback
from .adapters.rank_layer import rank_layers, register_rank_layer
from .adapters.rank_report import write_rank_report
from .elastic.base_masks import BaseMasks
from .elastic.search_space import elastic_space

SPARSE_BASE = "sparse_base"


def evaluate(cfg: RunConfig, model, tokenizer, run_data: RunData, eval_set, collator) -> dict:
    """The eval.metrics on held-out data (sharded over the processes), or accuracy for a classifier."""
    if run_data.kind == "classification":
        return evaluate_classifier(model, tokenizer, run_data.eval, cfg.eval.batch_size, cfg.data.max_length)
    start = time.perf_counter()
    metrics = eval_metrics.resolve(cfg.eval.metrics, run_data.kind, bool(cfg.data.task), run_data.eval, tokenizer,
                                   cfg.eval.max_new_tokens)
    labels = None
    if "choice" in metrics:
        labels = eval_metrics.label_set(cfg.eval.choices, itertools.chain(run_data.train_records(), run_data.eval))
    result = eval_metrics.evaluate_task(model, tokenizer, run_data.eval, eval_set, collator, metrics, labels=labels,
                                        batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens)
    return {**result, "seconds": round(time.perf_counter() - start, 3)}


class SoRAStageEval(TrainerCallback):
    """Held-out loss, threshold and sparsity when the dense phase and each threshold stage end (all processes
    evaluate, as forward passes under ZeRO-3 / FSDP2 are collective)."""

    def __init__(self, controller: SoRAController, evaluate_fn, records: list):
        self.controller, self.evaluate_fn, self.records = controller, evaluate_fn, records

    def on_step_end(self, args, state, control, model=None, **kwargs):
        done = state.global_step  # optimizer steps completed; the last one had index done - 1
        c = self.controller
        if c.stage_of(done - 1) != c.stage_of(done) or done == state.max_steps:
            record = {"step": done, "stage": c.stage_of(done - 1), "threshold": c.threshold(done - 1),
                      **{k.removeprefix("sora/"): v for k, v in c.log_metrics().items() if k != "sora/threshold"},
                      "eval_loss": self.evaluate_fn()["loss"]}
            self.records.append(record)
            if state.is_world_process_zero:
                print(f"[flexrank] SoRA stage {record['stage']} ended at step {done}: threshold "
                      f"{record['threshold']:.4g}, zero gates {record['zero_gates']:.3f}, "
                      f"active rank {record['active_rank']:.0f}, held-out loss {record['eval_loss']:.4f}")


def build_controller(cfg: RunConfig, peft_model, steps_per_epoch: int) -> RankController | None:
    layers = rank_layers(peft_model)
    if cfg.adapter.method == "adalora":
        c, t = cfg.adapter.adalora, cfg.training
        total = t["max_steps"] if t.get("max_steps", -1) > 0 else math.ceil(
            t.get("num_train_epochs", 3) * steps_per_epoch)
        if c.tinit >= total - c.tfinal:
            raise ConfigError("adapter.adalora.tinit", c.tinit, f"< total steps - tfinal = {total - c.tfinal}")
        return AdaLoRAController(layers, target_r=c.target_r, total_step=total, tinit=c.tinit, tfinal=c.tfinal,
                                 delta_t=c.deltaT, beta1=c.beta1, beta2=c.beta2, orth_reg_weight=c.orth_reg_weight,
                                 gradient_accumulation_steps=t.get("gradient_accumulation_steps", 1))
    if cfg.adapter.method == "sora":
        c = cfg.adapter.sora
        return SoRAController(layers, sparse_lambda=c.sparse_lambda, threshold=c.threshold, prox=c.prox,
                              gate_lr=c.gate_lr, **c.schedule.model_dump())
    if cfg.adapter.method != "elastic":
        return None
    e = cfg.adapter.elastic
    space = elastic_space(e, list(layers), cfg.adapter.r, peft_model)
    seed = e.seed if e.seed is not None else cfg.training["seed"]
    masked, modules = space.base_module_widths(space.maximal()), dict(peft_model.named_modules())
    masks = BaseMasks(peft_model, {m: modules[m].in_features for m in masked}) if masked else None
    return ElasticController(layers, space, seed=seed, steps_per_epoch=steps_per_epoch, sandwich=e.sandwich,
                             base_masks=masks)


def _steps_per_epoch(cfg: RunConfig, n_train: int) -> int:
    t = cfg.training
    # The process group does not exist yet when controllers are built; the launcher's WORLD_SIZE does.
    batches = math.ceil(n_train / (t["per_device_train_batch_size"] * _world_size()))
    return max(1, batches // t.get("gradient_accumulation_steps", 1))


def training_arguments(cfg: RunConfig) -> TrainingArguments:
    use_liger, why = choose_liger(cfg.model.liger_kernel)
    if _is_main_process():
        print(f"[flexrank] liger kernel: {'on' if use_liger else 'off'} ({why})")
    try:
        return TrainingArguments(**{**cfg.training, "use_liger_kernel": use_liger})
    except (TypeError, ValueError) as exc:
        raise ConfigError("training", {k: v for k, v in cfg.training.items()}, "valid TrainingArguments",
                          str(exc).splitlines()[0]) from None


def subnet_report(controller: ElasticController, peft_model) -> dict:
    active = sum(int(torch.count_nonzero(l.lora_rank_mask["default"])) * (l.in_features + l.out_features)
                 for l in controller.layers.values())
    return {"config": dict(controller.config), "active_rank": controller.active_rank(), "active_lora_params": active}


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def _is_main_process() -> bool:  # usable before the process group exists
    return int(os.environ.get("RANK", 0)) == 0


def resume_point(cfg: RunConfig, out: Path) -> Path | None:
    """The checkpoint to resume from, adapting gradient accumulation when the world size changed so that every
    optimizer step still sees the same samples (global batch = per-device batch x accumulation x processes).
    Whatever the backend: the trainable state of a checkpoint also exists in a world-size-independent form."""
    main = _is_main_process()
    ckpt = checkpoints.resolve_resume(cfg.training.pop("resume_from_checkpoint", None), out,
                                      warn=print if main else (lambda *_: None), set_aside=main)
    if ckpt is None:
        return None
    saved, t = checkpoints.meta(ckpt), cfg.training
    world = _world_size()
    if saved["world_size"] != world:  # sharded state then resumes from the checkpoint's portable_state file
        global_batch = saved["per_device_train_batch_size"] * saved["gradient_accumulation_steps"] * saved["world_size"]
        per_step = t["per_device_train_batch_size"] * world
        if global_batch % per_step:
            raise ConfigError("training.per_device_train_batch_size", t["per_device_train_batch_size"],
                              f"a divisor of the checkpoint's global batch {global_batch} / {world} processes")
        t["gradient_accumulation_steps"] = global_batch // per_step
        if main:
            print(f"[flexrank] resume: world size {saved['world_size']} -> {world}; gradient_accumulation_steps "
                  f"{saved['gradient_accumulation_steps']} -> {t['gradient_accumulation_steps']} keeps the global "
                  f"batch at {global_batch} samples, so training continues at sample "
                  f"{saved['global_step'] * global_batch}")
    return ckpt


def train(cfg: RunConfig) -> dict:
    preemption = PreemptionCallback()  # SIGTERM/SIGUSR1 from here on: checkpoint at a step boundary, then stop
    try:
        return _train(cfg, preemption)
    finally:
        preemption.restore_handlers()


def _train(cfg: RunConfig, preemption: PreemptionCallback) -> dict:
    out = Path(cfg.training["output_dir"])
    apply_cpu_shims()
    resume = resume_point(cfg, out)
    args = training_arguments(cfg)  # validates the training section before anything heavy
    set_seed(args.seed)
    tokenizer = load_tokenizer(cfg.model)
    run_data = load_data(cfg)
    with args.main_process_first(desc="tokenizing"):  # the main process tokenizes; the others load its cache
        train_tokens = tokenize_train(cfg, tokenizer, run_data, contextlib.nullcontext)
        eval_set = tokenize(cfg, tokenizer, run_data.eval, run_data.kind, run_data.eval_key, contextlib.nullcontext)
    train_set = train_tokens.dataset
    collator = data_lib.make_collator(tokenizer, cfg.data.packing)
    eval_collator = data_lib.make_collator(tokenizer, False)
    if _is_main_process():
        print(f"[flexrank] data: {len(train_set)} train / {len(eval_set)} held-out records ({run_data.kind})")

    with zero3_init_as_configured(args):
        model = load_base_model(cfg.model, tokenizer)
    metrics: dict = {"data": {"train": len(train_set), "eval": len(eval_set)},
                     "truncation": {k: train_tokens.stats[k] for k in ("truncated", "dropped")}}
    if cfg.adapter.sparsity:
        from .adapters.sparsity import wanda_prune

        calib = eval_collator([train_set[i] for i in range(min(cfg.adapter.sparsity.calibration_samples, len(train_set)))])
        metrics["sparsity"] = wanda_prune(model, [calib], cfg.adapter.sparsity.ratio)
        metrics["sparsity"].pop("per_module", None)
        print(f"[flexrank] Wanda: base sparsity {metrics['sparsity']['ratio_achieved']:.4f}")
        if _is_main_process():  # the adapter belongs to this pruned base: keep it, for export and serving
            with atomic_path(out / SPARSE_BASE) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
    nncf_method = quant_nncf.method_of(cfg)
    nncf_int4 = nncf_method == quant_nncf.QAT
    trace_sample = eval_collator([train_set[0]]) if nncf_method else None  # nncf traces the model on it
    if nncf_int4:  # INT4 QAT: adapters live in nncf's weight quantizers, not in peft
        peft_model = quant_nncf.compress(model, cfg, trace_sample)
        controller = quant_nncf.build_controller(cfg, peft_model, _steps_per_epoch(cfg, len(train_set)))
    else:
        peft_model = apply_adapter(model, cfg.adapter, cfg.model.task_type)
        controller = build_controller(cfg, peft_model, _steps_per_epoch(cfg, len(train_set)))
    metrics["parameters"] = count_parameters(peft_model)

    if cfg.eval.before:
        metrics["before"] = evaluate(cfg, peft_model, tokenizer, run_data, eval_set, eval_collator)
        if _is_main_process():
            print(f"[flexrank] before training: {_summary(metrics['before'])}")
    trainer = FlexTrainer(model=peft_model, args=args, train_dataset=train_set, data_collator=collator,
                          controller=controller)
    if isinstance(controller, SoRAController) and cfg.adapter.sora.evaluate_stages:
        stages = metrics["sora_stages"] = []
        trainer.add_callback(SoRAStageEval(controller, lambda: evaluate_loss(
            peft_model, eval_set, eval_collator, batch_size=cfg.eval.batch_size, shard=current_shard()), stages))
    trainer.add_callback(preemption)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if preemption.stopped_at is not None:  # a checkpoint, but no metrics/adapter as if the run had finished
        raise Preempted(preemption.stopped_at, preemption.signum)
    metrics["train"] = {**result.metrics, "backend": backend_of(trainer),
                        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
                        "world_size": args.world_size, "resumed_from": str(resume) if resume else None}
    main = trainer.is_world_process_zero()
    full_state = full_state_dict(trainer)  # gathered from ZeRO-3 / FSDP2 shards; a collective

    if main and controller is not None and not nncf_int4:  # the whole rank-controlled adapter (all ranks, gates)
        with atomic_path(out / "supernet") as tmp:
            tmp.mkdir()
            save_file({k: v.contiguous() for k, v in
                       get_peft_model_state_dict(peft_model, state_dict=full_state).items()},
                      tmp / "adapter_model.safetensors")
            peft_model.peft_config["default"].save_pretrained(tmp)
            torch.save(controller.state_dict(), tmp / STATE_FILE)  # masks, importance, sampler
    if isinstance(controller, ElasticController):
        from .elastic.cost import CostModel, format_size_report, size_report

        if not nncf_int4:  # nncf's adapters live in weight quantizers, not in rank layers the cost model counts
            metrics["size"] = size_report(CostModel.of(peft_model), controller.space)  # module shapes: no gathering
            if main:
                print("[flexrank] size: " + "; ".join(format_size_report(metrics["size"]).splitlines()))
        metrics["subnets"] = {}
        for which in cfg.adapter.elastic.evaluate_subnets if cfg.eval.after else []:
            controller.activate(which)
            metrics["subnets"][which] = {**subnet_report(controller, peft_model),
                                         **evaluate(cfg, peft_model, tokenizer, run_data, eval_set, eval_collator)}
            if main:
                print(f"[flexrank] after training, {which} subnet: {_summary(metrics['subnets'][which])}")
        export_subnet = cfg.adapter.elastic.export_subnet
        controller.activate(export_subnet)
        metrics["after"] = metrics["subnets"].get(export_subnet, {}) if isinstance(export_subnet, str) else {}
    elif cfg.eval.after:
        metrics["after"] = evaluate(cfg, peft_model, tokenizer, run_data, eval_set, eval_collator)
    int4_ptq = None
    if nncf_method == quant_nncf.PTQ:  # the baseline: float LoRA merged, then INT4 post-training compression
        int4_ptq = quant_nncf.compress_merged(peft_model, cfg, trace_sample)
        if cfg.eval.after:
            metrics["after_float"] = metrics["after"]
            metrics["after"] = evaluate(cfg, int4_ptq, tokenizer, run_data, eval_set, eval_collator)
    if main:
        if nncf_int4:  # the INT4 model with the (export subnet's) adapters absorbed, and the whole supernet
            metrics["export"] = quant_nncf.export_int4(peft_model, tokenizer, out, {"input_ids": trace_sample["input_ids"]})
            quant_nncf.save_supernet(controller, out / quant_nncf.SUPERNET_FILE)
        else:
            try:
                metrics["export"] = export_plain_adapter(peft_model, out / "adapter", full_state=full_state)
            except NothingToExport as exc:  # training itself finished: keep its metrics and rank report
                print(f"[flexrank] no adapter written: {exc}")
                metrics["export"] = {"error": str(exc), "modules": 0, "total_rank": 0, "params": 0, "rank_pattern": {}}
        if int4_ptq is not None:
            metrics["export"].update(quant_nncf.save_int4(int4_ptq, tokenizer, out / quant_nncf.INT4_DIR))
        if isinstance(controller, (SoRAController, AdaLoRAController)):
            ranks = metrics["export"]["rank_pattern"]
            every = {n.removeprefix("base_model.model."): 0 for n in controller.layers}  # pruned modules: rank 0
            write_rank_report({**every, **ranks}, cfg.adapter.r, out)
    trainer.accelerator.wait_for_everyone()
    if not main:
        return metrics
    if isinstance(controller, ElasticController):
        write_atomic(out / "elastic_samples.jsonl", "".join(  # the subnet trained at every optimizer step
            json.dumps({"step": k, "subnet": v}) + "\n" for k, v in sorted(controller.history.items())))
    if metrics.get("after"):
        print(f"[flexrank] after training: {_summary(metrics['after'])}")
    write_atomic(out / "config.yaml", dump_config(cfg))
    write_json(out / "metrics.json", metrics)
    model_dir = quant_nncf.INT4_DIR if nncf_method else "adapter"
    print(f"[flexrank] wrote {out}/{model_dir}, {out}/metrics.json, {out}/config.yaml")
    return metrics


def _summary(m: dict) -> str:
    """One line per evaluation phase: the task metrics first (user metrics too), then loss, then the time."""
    first = ("exact_match", "choice", "accuracy")
    skip = ("n", "tokens", "choice_labels", "seconds", "active_rank", "active_lora_params", "loss", "perplexity")
    keys = [k for k in first if k in m] + [k for k, v in m.items() if k not in first + skip
                                           and isinstance(v, (int, float)) and not isinstance(v, bool)]
    line = ", ".join(f"{k}={m[k]:.4f}" for k in keys + [k for k in ("loss", "perplexity") if k in m])
    return line + (f" ({m['n']} records, {m['seconds']:.1f} s)" if "seconds" in m else "")


def load_run(run_dir: str | Path, overrides: list[str] = ()):
    """(cfg, tokenizer, peft_model, controller) of a finished run, for export, evaluation and search."""
    from peft import PeftModel

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml", overrides)
    if (run_dir / SPARSE_BASE).exists():
        cfg.model.name_or_path = str(run_dir / SPARSE_BASE)
    tokenizer = load_tokenizer(cfg.model)
    if quant_nncf.method_of(cfg) == quant_nncf.PTQ:  # the run's model is the compressed INT4 one
        return cfg, tokenizer, quant_nncf.load_int4(run_dir / quant_nncf.INT4_DIR / "model.pt"), None
    model = load_base_model(cfg.model, tokenizer)
    if quant_nncf.method_of(cfg) == quant_nncf.QAT:
        return (cfg, tokenizer, *quant_nncf.load_qat_run(cfg, run_dir, model,
                                                          _steps_per_epoch(cfg, len(load_data(cfg).train))))
    if cfg.adapter.method not in RANK_METHODS:
        return cfg, tokenizer, PeftModel.from_pretrained(model, run_dir / "adapter"), None
    from peft import LoraConfig

    peft_cfg = register_rank_layer(LoraConfig.from_pretrained(run_dir / "supernet"))
    peft_model = PeftModel.from_pretrained(model, run_dir / "supernet", config=peft_cfg)
    n_train = len(tokenize_train(cfg, tokenizer, load_data(cfg)).dataset)
    controller = build_controller(cfg, peft_model, _steps_per_epoch(cfg, n_train))
    controller.load_state_dict(torch.load(run_dir / "supernet" / STATE_FILE, weights_only=True))
    return cfg, tokenizer, peft_model, controller
