"""Train a tiny elastic supernet with FlexTrainer; each process writes what it sampled and its losses.

Run alone or under `accelerate launch --multi_gpu --num_processes 2` with ACCELERATE_USE_CPU=true (gloo)."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import tiny_llama_config  # noqa: E402
from elastic_helpers import ProgressionData, elastic_supernet  # noqa: E402
from transformers import LlamaForCausalLM, TrainingArguments  # noqa: E402

from flexrank.training.trainer import FlexTrainer  # noqa: E402


def main(out_dir: str) -> None:
    torch.manual_seed(0)
    model, controller = elastic_supernet(LlamaForCausalLM(tiny_llama_config()), sandwich=False)
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=6, learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, seed=0, gradient_checkpointing=True,
                             gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = FlexTrainer(model=model, args=args, train_dataset=ProgressionData(), controller=controller)
    trainer.train()
    rank = int(os.environ.get("RANK", 0))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"records": controller.records, "losses": losses,
                   "world_size": int(os.environ.get("WORLD_SIZE", 1))}, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    # Distributed CPU runs sometimes abort in interpreter teardown after finishing (reference/distributed.md §5).
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
