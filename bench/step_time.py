"""Step time of flexrank vs plain peft + transformers.Trainer, on the same model, data and batch, in one run.

    python bench/step_time.py [--model smollm2-135m-instruct] [--steps 12] [--batch 8]

Prints one line per variant: median seconds per optimizer step (after warm-up) and the ratio to plain peft LoRA.
"""

import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from flexrank.trainer import data as data_lib
from flexrank.trainer.config import load_config
from flexrank.trainer.flex_trainer import FlexTrainer
from flexrank.trainer.modeling import apply_adapter, load_base_model, load_tokenizer
from flexrank.trainer.run import build_controller, load_data, tokenize_train

VARIANTS = {
    "flexrank lora": {"method": "lora", "r": 16},
    "flexrank elastic [16,12,8]": {"method": "elastic", "r": 16, "elastic": {"search_space": {
        "groups": [["q_proj", "k_proj", "v_proj"], ["up_proj"], ["down_proj"]], "widths": [16, 12, 8]}}},
    "flexrank sora": {"method": "sora", "r": 16, "sora": {"threshold": 1e-3}},
}


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self.start = [], None

    def on_step_begin(self, args, state, control, **kw):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.start)


def measure(trainer_cls, model, dataset, collator, steps, batch, **kw) -> float:
    timer = StepTimer()
    args = TrainingArguments(output_dir="/tmp/flexrank-bench", max_steps=steps, per_device_train_batch_size=batch,
                             learning_rate=1e-4, report_to=[], save_strategy="no", logging_steps=10 ** 6,
                             disable_tqdm=True, seed=0)
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[timer], **kw)
    trainer.train()
    return statistics.median(timer.times[2:])  # skip warm-up steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    a = parser.parse_args()
    torch.manual_seed(0)
    cfg = load_config(raw={"model": {"name_or_path": a.model}, "data": {"train_size": a.batch * a.steps}})
    tokenizer = load_tokenizer(cfg.model)
    dataset = tokenize_train(cfg, tokenizer, load_data(cfg)).dataset
    collator = data_lib.make_collator(tokenizer, False)

    def plain() -> float:
        base = get_peft_model(load_base_model(cfg.model, tokenizer, log=lambda *_: None),
                              LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        return measure(Trainer, base, dataset, collator, a.steps, a.batch)

    # The reference runs first and last: the first run in a process also pays warm-up (allocator, page cache),
    # so ratios use the later, warm reference, and the first is printed to show the size of that effect.
    first = plain()
    results = {}
    for name, adapter in VARIANTS.items():
        vcfg = load_config(raw={"model": {"name_or_path": a.model}, "adapter": adapter})
        model = apply_adapter(load_base_model(vcfg.model, tokenizer, log=lambda *_: None), vcfg.adapter, "causal_lm")
        controller = build_controller(vcfg, model, steps_per_epoch=a.steps)
        results[name] = measure(FlexTrainer, model, dataset, collator, a.steps, a.batch, controller=controller)
    reference = plain()
    print(f"{'plain peft LoRA r=16 + Trainer':32s} {reference:.3f} s/step  1.00x  (first, cold: {first:.3f})")
    for name, seconds in results.items():
        print(f"{name:32s} {seconds:.3f} s/step  {seconds / reference:.2f}x")


if __name__ == "__main__":
    main()
