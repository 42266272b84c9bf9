"""One training run end to end: data, model, adapter, controller, metrics before/after, outputs.

Output folder: config.yaml (resolved), metrics.json, adapter/ (plain peft), supernet/ (rank methods),
sparse_base/ (the Wanda-pruned base, Shears), runs/ TensorBoard logs, checkpoints as the training arguments say.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainingArguments, set_seed

from . import data as data_lib
from .config import RunConfig, dump_config, load_config
from .controllers import ElasticController, RankController
from .errors import ConfigError
from .evaluation import evaluate_classification, evaluate_generation, evaluate_loss
from .export import export_plain_adapter
from .flex_trainer import FlexTrainer, write_json
from .kernels import choose_liger
from .modeling import apply_adapter, count_parameters, load_base_model, load_tokenizer
from .rank_layer import rank_layers, register_rank_layer
from .search_space import space_from_nncf, space_from_spec
from .tasks import get_task

SPARSE_BASE = "sparse_base"


@dataclass
class RunData:
    kind: str  # generation | classification | text
    train: list[dict]
    eval: list[dict]


def load_data(cfg: RunConfig) -> RunData:
    d = cfg.data
    if d.task:
        task = get_task(d.task)
        expected = "seq_cls" if task.kind == "classification" else "causal_lm"
        if cfg.model.task_type != expected:
            raise ConfigError("data.task", d.task, f"a task for model.task_type {cfg.model.task_type!r}",
                              f"{d.task} is a {task.kind} task: set model.task_type: {expected}")
        train, held_out = task.split_fn(seed=d.seed, eval_size=d.eval_size, train_size=d.train_size)
        return RunData(task.kind, train, held_out)
    records = data_lib.load_records(d.path, d.format)
    if d.eval_path:
        held_out = data_lib.load_records(d.eval_path, d.format)
    else:  # a seeded held-out split of the training file
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(d.seed)).tolist()
        n_eval = min(d.eval_size, len(records) // 5)
        held_out, records = [records[i] for i in order[:n_eval]], [records[i] for i in order[n_eval:]]
    kind = "text" if data_lib.record_format(records[0]) == "text" else "generation"
    return RunData(kind, records[: d.train_size] if d.train_size else records, held_out)


def tokenize(cfg: RunConfig, tokenizer, records: list[dict], kind: str) -> data_lib.TokenizedDataset:
    if kind == "classification":
        items = [data_lib.tokenize_classification(tokenizer, r, cfg.data.max_length) for r in records]
    else:
        items = [data_lib.tokenize_record(tokenizer, r, cfg.data.max_length, cfg.data.response_only_loss)
                 for r in records]
    return data_lib.TokenizedDataset(items)


def evaluate(cfg: RunConfig, model, tokenizer, run_data: RunData, eval_set, collator) -> dict:
    """The task metric on held-out data, plus loss/perplexity for language modelling."""
    if run_data.kind == "classification":
        return evaluate_classification(model, tokenizer, run_data.eval, batch_size=cfg.eval.batch_size,
                                       max_length=cfg.data.max_length)
    result = evaluate_loss(model, eval_set, collator, batch_size=cfg.eval.batch_size)
    if run_data.kind == "generation" and cfg.data.task:
        result.update(evaluate_generation(model, tokenizer, run_data.eval, batch_size=cfg.eval.batch_size,
                                          max_new_tokens=cfg.eval.max_new_tokens))
    return result


def build_controller(cfg: RunConfig, peft_model, steps_per_epoch: int) -> RankController | None:
    if cfg.adapter.method != "elastic":
        return None
    layers = rank_layers(peft_model)
    e = cfg.adapter.elastic
    if e.nncf_config:
        space = space_from_nncf(e.nncf_config, list(layers), cfg.adapter.r)
    else:
        space = space_from_spec(e.search_space, list(layers), cfg.adapter.r)
    seed = e.seed if e.seed is not None else cfg.training["seed"]
    return ElasticController(layers, space, seed=seed, steps_per_epoch=steps_per_epoch, sandwich=e.sandwich)


def _steps_per_epoch(cfg: RunConfig, n_train: int) -> int:
    t = cfg.training
    world = int(torch.distributed.get_world_size()) if torch.distributed.is_initialized() else 1
    batches = math.ceil(n_train / (t["per_device_train_batch_size"] * world))
    return max(1, batches // t.get("gradient_accumulation_steps", 1))


def training_arguments(cfg: RunConfig) -> TrainingArguments:
    use_liger, why = choose_liger(cfg.model.liger_kernel)
    print(f"[flexrank] liger kernel: {'on' if use_liger else 'off'} ({why})")
    try:
        return TrainingArguments(**{**cfg.training, "use_liger_kernel": use_liger})
    except (TypeError, ValueError) as exc:
        raise ConfigError("training", {k: v for k, v in cfg.training.items()}, "valid TrainingArguments",
                          str(exc).splitlines()[0]) from None


def subnet_report(controller: ElasticController, peft_model) -> dict:
    active = sum(int(torch.count_nonzero(l.rank_weights())) * (l.in_features + l.out_features)
                 for l in controller.layers.values())
    return {"config": dict(controller.config), "active_rank": controller.active_rank(), "active_lora_params": active}


def train(cfg: RunConfig) -> dict:
    out = Path(cfg.training["output_dir"])
    args = training_arguments(cfg)  # validates the training section before anything heavy
    set_seed(args.seed)
    tokenizer = load_tokenizer(cfg.model)
    run_data = load_data(cfg)
    train_set, eval_set = (tokenize(cfg, tokenizer, r, run_data.kind) for r in (run_data.train, run_data.eval))
    collator = data_lib.make_collator(tokenizer, cfg.data.packing)
    eval_collator = data_lib.make_collator(tokenizer, False)
    print(f"[flexrank] data: {len(train_set)} train / {len(eval_set)} held-out records ({run_data.kind})")

    model = load_base_model(cfg.model, tokenizer)
    metrics: dict = {"data": {"train": len(train_set), "eval": len(eval_set)}}
    if cfg.adapter.sparsity:
        from .sparsity import wanda_prune

        calib = eval_collator([train_set[i] for i in range(min(cfg.adapter.sparsity.calibration_samples, len(train_set)))])
        metrics["sparsity"] = wanda_prune(model, [calib], cfg.adapter.sparsity.ratio)
        metrics["sparsity"].pop("per_module", None)
        print(f"[flexrank] Wanda: base sparsity {metrics['sparsity']['ratio_achieved']:.4f}")
        # The adapter belongs to this pruned base: keep it, for export, evaluation and serving.
        model.save_pretrained(out / SPARSE_BASE)
        tokenizer.save_pretrained(out / SPARSE_BASE)
    peft_model = apply_adapter(model, cfg.adapter, cfg.model.task_type)
    metrics["parameters"] = count_parameters(peft_model)
    controller = build_controller(cfg, peft_model, _steps_per_epoch(cfg, len(train_set)))

    if cfg.eval.before:
        metrics["before"] = evaluate(cfg, peft_model, tokenizer, run_data, eval_set, eval_collator)
        print(f"[flexrank] before training: {_summary(metrics['before'])}")
    trainer = FlexTrainer(model=peft_model, args=args, train_dataset=train_set, data_collator=collator,
                          controller=controller)
    result = trainer.train(resume_from_checkpoint=cfg.training.get("resume_from_checkpoint"))
    metrics["train"] = result.metrics

    if controller is None:
        if cfg.eval.after:
            metrics["after"] = evaluate(cfg, peft_model, tokenizer, run_data, eval_set, eval_collator)
        peft_model.save_pretrained(out / "adapter")
    else:
        metrics["subnets"] = {}
        for which in cfg.adapter.elastic.evaluate_subnets if cfg.eval.after else []:
            controller.activate(which)
            metrics["subnets"][which] = {**subnet_report(controller, peft_model),
                                         **evaluate(cfg, peft_model, tokenizer, run_data, eval_set, eval_collator)}
            print(f"[flexrank] after training, {which} subnet: {_summary(metrics['subnets'][which])}")
        peft_model.save_pretrained(out / "supernet")
        controller.activate(cfg.adapter.elastic.export_subnet)
        metrics["export"] = export_plain_adapter(peft_model, out / "adapter")
        metrics["after"] = metrics["subnets"].get(cfg.adapter.elastic.export_subnet, {}) if isinstance(
            cfg.adapter.elastic.export_subnet, str) else {}
    if "after" in metrics and metrics["after"]:
        print(f"[flexrank] after training: {_summary(metrics['after'])}")
    (out / "config.yaml").write_text(dump_config(cfg))
    write_json(out / "metrics.json", metrics)
    print(f"[flexrank] wrote {out}/adapter, {out}/metrics.json, {out}/config.yaml")
    return metrics


def _summary(m: dict) -> str:
    keys = ("exact_match", "accuracy", "loss", "perplexity")
    return ", ".join(f"{k}={m[k]:.4f}" for k in keys if k in m)


def load_run(run_dir: str | Path):
    """(cfg, tokenizer, peft_model, controller) of a finished run, for export and evaluation."""
    from peft import PeftModel

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    if (run_dir / SPARSE_BASE).exists():
        cfg.model.name_or_path = str(run_dir / SPARSE_BASE)
    tokenizer = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model, tokenizer)
    if cfg.adapter.method != "elastic":
        return cfg, tokenizer, PeftModel.from_pretrained(model, run_dir / "adapter"), None
    from peft import LoraConfig

    peft_cfg = register_rank_layer(LoraConfig.from_pretrained(run_dir / "supernet"))
    peft_model = PeftModel.from_pretrained(model, run_dir / "supernet", config=peft_cfg)
    n_train = len(load_data(cfg).train)
    return cfg, tokenizer, peft_model, build_controller(cfg, peft_model, _steps_per_epoch(cfg, n_train))
