"""The methods peft ships (LoRA, DoRA, rsLoRA, MiSS/BAT) and the peft config of every method: the rank-controlled
methods use flexrank's rank layer inside peft's LoRA, so peft's save, load, merge and QLoRA paths keep working."""

import torch
from peft import LoraConfig, MissConfig, TaskType, get_peft_model

from ..config import AdapterConfig
from ..controllers.base import StepPlan
from .method import AdapterMethod
from .rank_layer import register_rank_layer

RANK_METHODS = ("elastic", "sora", "adalora")  # methods on flexrank's rank layer, driven by a controller
_TASK_TYPES = {"causal_lm": TaskType.CAUSAL_LM, "seq_cls": TaskType.SEQ_CLS}


def adapter_config(cfg: AdapterConfig, task_type: str):
    """The peft config for the adapter method (elastic uses flexrank's rank layer inside peft's LoRA)."""
    task = _TASK_TYPES[task_type]
    if cfg.method in ("miss", "bat"):
        init = "bat" if cfg.method == "bat" else ("mini" if cfg.mini_r else True)
        extra = {"mini_r": cfg.mini_r} if cfg.mini_r else {}
        return MissConfig(r=cfg.r, target_modules=cfg.target_modules, init_weights=init, task_type=task, **extra)
    config = LoraConfig(
        r=cfg.r, lora_alpha=cfg.lora_alpha or 2 * cfg.r, lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules, use_dora=cfg.method == "dora", use_rslora=cfg.method == "rslora",
        layer_replication=cfg.layer_replication, rank_pattern=cfg.rank_pattern or {},
        alpha_pattern=cfg.alpha_pattern or {}, task_type=task,
    )
    return register_rank_layer(config) if cfg.method in RANK_METHODS else config


def apply_adapter(model, cfg: AdapterConfig, task_type: str):
    peft_model = get_peft_model(model, adapter_config(cfg, task_type))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if cfg.sora is not None and cfg.sora.gate_init == "normal" and ".lora_gate." in name:
                param.normal_()  # as the SoRA repository initialises its gates
            if cfg.adalora is not None:  # AdaLoRA: Λ (the gate) = 0, A and B random (peft's init)
                if ".lora_gate." in name:
                    param.zero_()
                elif ".lora_A." in name or ".lora_B." in name:
                    param.normal_(mean=0.0, std=0.02)
    return peft_model


class PeftMethod(AdapterMethod):
    """LoRA, DoRA, rsLoRA, MiSS, BAT: peft's own layers, no controller."""

    def build(self, base_model, plan: StepPlan, sample) -> None:
        self.model = apply_adapter(base_model, self.cfg.adapter, self.cfg.model.task_type)
