"""The baseline a user writes without flexrank, kept plain on purpose: transformers' model loading, peft's
get_peft_model (LoraConfig / AdaLoraConfig, bitsandbytes for QLoRA), transformers' own collators and the stock
Trainer. Same model, data, adapter shapes and TrainingArguments as the flexrank side (measure.py)."""

import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForSeq2Seq,
                          DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments)

from flexrank.models.loading import _model_path

STOCK_METHODS = ("lora", "dora", "qlora", "adalora")  # the others have no stock peft equivalent


class AdaLoraBudget(TrainerCallback):
    """peft's AdaLoRA needs update_and_allocate after each optimizer step, before the gradients are zeroed."""

    def __init__(self, model):
        self.model = model

    def on_optimizer_step(self, args, state, control, **kw):
        self.model.base_model.update_and_allocate(state.global_step)


def trainer(spec: dict, cfg, tokenizer, dataset, clock, counting):
    """The stock Trainer; `counting` wraps its collator with the same token counting as the flexrank side."""
    method, total = spec["method"], spec["warmup"] + spec["steps"]
    # The flexrank side's model settings, in transformers' words: dtype, attention kernel (flexrank's "auto" has no
    # stock equivalent: transformers' default then), 4-bit compute dtype.
    kwargs = {"dtype": getattr(torch, cfg.model.dtype)}
    if cfg.model.attn_implementation != "auto":
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, cfg.model.quantization.bnb_4bit_compute_dtype),
            bnb_4bit_quant_storage=torch.bfloat16)
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(_model_path(cfg.model), **kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    # What fine-tuning scripts write: no KV cache in training. With one, transformers 5 builds no block-diagonal mask
    # for packed rows under SDPA/eager and the examples of a row attend to each other (flexrank's PackingCollator
    # says use_cache=False in each batch for the same reason).
    model.config.use_cache = False
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    common = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}
    if method == "adalora":
        peft_config = AdaLoraConfig(init_r=8, target_r=4, tinit=1, tfinal=1, deltaT=1, total_step=total,
                                    **{k: v for k, v in common.items() if k != "r"})
    else:
        peft_config = LoraConfig(use_dora=method == "dora", **common)
    model = get_peft_model(model, peft_config)
    collator = counting(DataCollatorWithFlattening() if spec["packing"]
                                else DataCollatorForSeq2Seq(tokenizer, padding=True))
    callbacks = [clock] + ([AdaLoraBudget(model)] if method == "adalora" else [])
    args = TrainingArguments(**cfg.training)
    return Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=callbacks), collator
