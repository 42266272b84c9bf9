"""The methods on flexrank's rank layer, each driven by a controller: the elastic supernet (LoNAS / Shears),
AdaLoRA and SoRA. Besides the plain peft adapter, a run keeps `supernet/`: every rank and gate with the controller's
state (masks, importance, sampler), from which eval, export and search rebuild the trained model."""

import json
from collections.abc import Callable
from pathlib import Path

import torch
from peft import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import TrainerCallback

from ..controllers import AdaLoRAController, ElasticController, SoRAController
from ..controllers.base import STATE_FILE, StepPlan
from ..elastic import importance
from ..elastic.base_masks import BaseMasks, find_base_targets
from ..elastic.distillation import Distillation
from ..elastic.search_space import elastic_space
from ..distributed import env
from ..errors import ConfigError
from ..evaluation.metrics import summary_line
from ..io import output_folder, write_atomic
from .peft_methods import PeftMethod
from .rank_layer import rank_layers, register_rank_layer
from .rank_report import write_rank_report

SUPERNET = "supernet"


class RankMethod(PeftMethod):
    """peft's LoRA with flexrank's rank layer (adapter_config registers it), and a controller."""
    output_folders = ("adapter", SUPERNET)

    def build(self, base_model, plan: StepPlan, sample) -> None:
        super().build(base_model, plan, sample)
        self.prepare(sample)
        self.controller = self.make_controller(plan)

    def prepare(self, sample) -> None:
        """After the adapter is added, before the controller: anything the method does to the model first."""

    def save_supernet_extras(self, folder: Path) -> None:
        """More files of the whole trained state, in `supernet/`."""

    def make_controller(self, plan: StepPlan):
        raise NotImplementedError

    def save_trained_state(self, out: Path, full_state: dict) -> None:
        with output_folder(out / SUPERNET, "training.output_dir") as tmp:  # all ranks, gates: the whole adapter
            save_file({k: v.contiguous() for k, v in
                       get_peft_model_state_dict(self.model, state_dict=full_state).items()},
                      tmp / "adapter_model.safetensors")
            self.model.peft_config["default"].save_pretrained(tmp)
            torch.save(self.controller.state_dict(), tmp / STATE_FILE)  # masks, importance, sampler
            self.save_supernet_extras(tmp)

    def load(self, run_dir: Path, base_model: Callable, plan_of: Callable[[], StepPlan]) -> None:
        from peft import LoraConfig, PeftModel

        peft_cfg = register_rank_layer(LoraConfig.from_pretrained(run_dir / SUPERNET))
        self.model = PeftModel.from_pretrained(base_model(), run_dir / SUPERNET, config=peft_cfg)
        self.controller = self.make_controller(plan_of())
        self.controller.load_state_dict(torch.load(run_dir / SUPERNET / STATE_FILE, weights_only=True))


class _PrunedRanks(RankMethod):
    """AdaLoRA and SoRA learn which ranks to keep: the run also writes ranks.csv / ranks.png."""

    def save(self, out: Path, full_state: dict, tokenizer, metrics: dict) -> None:
        super().save(out, full_state, tokenizer, metrics)
        every = {n.removeprefix("base_model.model."): 0 for n in self.controller.layers}  # pruned modules: rank 0
        write_rank_report({**every, **metrics["export"]["rank_pattern"]}, self.cfg.adapter.r, out)


class AdaLoRAMethod(_PrunedRanks):
    def make_controller(self, plan: StepPlan):
        c = self.cfg.adapter.adalora
        if c.tinit >= plan.total_steps - c.tfinal:
            raise ConfigError("adapter.adalora.tinit", c.tinit, f"< total steps - tfinal = {plan.total_steps - c.tfinal}")
        return AdaLoRAController(rank_layers(self.model), target_r=c.target_r, total_step=plan.total_steps,
                                 tinit=c.tinit, tfinal=c.tfinal, delta_t=c.deltaT, beta1=c.beta1, beta2=c.beta2,
                                 orth_reg_weight=c.orth_reg_weight,
                                 gradient_accumulation_steps=plan.gradient_accumulation_steps)


class SoRAMethod(_PrunedRanks):
    def make_controller(self, plan: StepPlan):
        c = self.cfg.adapter.sora
        return SoRAController(rank_layers(self.model), sparse_lambda=c.sparse_lambda, threshold=c.threshold,
                              prox=c.prox, gate_lr=c.gate_lr, **c.schedule.model_dump())

    def callbacks(self, evaluate_loss, metrics: dict) -> list:
        if not self.cfg.adapter.sora.evaluate_stages:
            return []
        return [SoRAStageEval(self.controller, evaluate_loss, metrics.setdefault("sora_stages", []))]


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


class ElasticMethod(RankMethod):
    """The elastic supernet: named or explicit subnets, each evaluated, searched and exported by switching masks.
    With `importance`, the base widths' channels are ordered by importance before training (elastic/importance.py);
    the order is saved in supernet/ and applied to the base whenever the run is reloaded."""
    has_subnets = True
    order: dict | None = None       # order_key -> unit permutation applied to the base (importance ordering)
    importance_report: dict | None = None

    def _space(self):
        e = self.cfg.adapter.elastic
        return elastic_space(e, list(rank_layers(self.model)), self.cfg.adapter.r, self.model)

    def prepare(self, sample) -> None:
        e = self.cfg.adapter.elastic
        if e.importance == "none":
            return
        space = self._space()
        masked = set(space.base_module_widths(space.maximal()))
        targets = [t for t in find_base_targets(self.model).values() if t.module in masked]
        if not targets:
            raise ConfigError("adapter.elastic.importance", e.importance, "none without base widths",
                              "the search space (base_widths or the NNCF JSON) has no base-width group to order")
        step = 8

        def batches():
            for start in range(0, e.importance_samples, step):
                batch = sample(min(step, e.importance_samples - start), start)
                if batch is None:
                    return
                yield batch

        order = self._checkpoint_order()  # a resumed run: the order it was trained with, not a new measurement
        source = f"from {self.resume_from.name}" if order is not None else "measured"
        if order is None:
            order = importance.broadcast_order(importance.compute_order(self.model, targets, e.importance, batches))
        moved = importance.apply_order(self.model, order)
        units = sum(p.numel() for p in order.values())
        self.order = order
        self.importance_report = {"method": e.importance, "groups": len(order), "units": units, "moved": moved,
                                  **({"samples": e.importance_samples} if e.importance == "activation" else {})}
        if env.is_main_process():
            print(f"[flexrank] importance ordering ({e.importance}, {source}): {len(order)} base-width groups, "
                  f"{moved} of {units} channels/head groups moved")

    def _checkpoint_order(self) -> dict | None:
        path = self.resume_from / STATE_FILE if self.resume_from is not None else None
        if path is None or not path.is_file():
            return None
        return torch.load(path, weights_only=True).get("base_order")  # absent in checkpoints of older versions

    def save_supernet_extras(self, folder: Path) -> None:
        if self.order is not None:
            importance.save_order(folder, self.order, self.cfg.adapter.elastic.importance)

    def load(self, run_dir: Path, base_model: Callable, plan_of: Callable[[], StepPlan]) -> None:
        order = importance.load_order(run_dir / SUPERNET)

        def ordered_base():
            model = base_model()
            if order is not None:  # the base the adapter was trained on
                importance.apply_order(model, order)
            return model

        self.order = order  # before super().load builds the controller, which checks its saved order
        super().load(run_dir, ordered_base, plan_of)

    def plain_state_transform(self):
        if self.order is None:
            return None
        return lambda state: importance.unpermute_adapter_state(state, self.model, self.order)

    def make_controller(self, plan: StepPlan):
        e = self.cfg.adapter.elastic
        layers = rank_layers(self.model)
        space = self._space()
        masked, modules = space.base_module_widths(space.maximal()), dict(self.model.named_modules())
        masks = BaseMasks(self.model, {m: modules[m].in_features for m in masked}) if masked else None
        distill = Distillation(**e.distill.model_dump()) if e.distill is not None else None
        return ElasticController(layers, space, seed=e.seed if e.seed is not None else plan.seed,
                                 steps_per_epoch=plan.steps_per_epoch, sandwich=e.sandwich, base_masks=masks,
                                 base_order=self.order, distill=distill)

    def evaluate_after(self, evaluate, main: bool) -> dict:
        from ..elastic.cost import CostModel, format_size_report, size_report

        metrics = {"size": size_report(CostModel.of(self.model), self.controller.space)}  # shapes: no gathering
        if self.importance_report is not None:
            metrics["importance"] = self.importance_report
        if main:
            print("[flexrank] size: " + "; ".join(format_size_report(metrics["size"]).splitlines()))
        metrics.update(self.evaluate_subnets(evaluate, main))
        return metrics

    def evaluate_subnets(self, evaluate, main: bool) -> dict:
        e, subnets = self.cfg.adapter.elastic, {}
        for which in e.evaluate_subnets if self.cfg.eval.after else []:
            self.controller.activate(which)
            subnets[which] = {**self.subnet_report(), **evaluate(self.model)}
            if main:
                print(f"[flexrank] after training, {which} subnet: {summary_line(subnets[which])}")
        self.controller.activate(e.export_subnet)
        after = subnets.get(e.export_subnet, {}) if isinstance(e.export_subnet, str) else {}
        return {"subnets": subnets, "after": after}

    def subnet_report(self) -> dict:
        c = self.controller
        active = sum(int(torch.count_nonzero(layer.lora_rank_mask["default"])) * (layer.in_features + layer.out_features)
                     for layer in c.layers.values())
        return {"config": dict(c.config), "active_rank": c.active_rank(), "active_lora_params": active}

    def save(self, out: Path, full_state: dict, tokenizer, metrics: dict) -> None:
        super().save(out, full_state, tokenizer, metrics)
        write_elastic_samples(self.controller, out)

    def activate(self, subnet) -> dict:
        return self.controller.activate(subnet)

    def subnets_to_evaluate(self, requested: list | None) -> list:
        return requested or ["heuristic"]

    def base_widths(self) -> dict:
        return self.controller.space.base_widths(self.controller.config)


def write_elastic_samples(controller: ElasticController, out: Path) -> None:
    write_atomic(out / "elastic_samples.jsonl", "".join(  # the subnet trained at every optimizer step
        json.dumps({"step": k, "subnet": v}) + "\n" for k, v in sorted(controller.history.items())))

