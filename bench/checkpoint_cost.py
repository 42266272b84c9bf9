"""What the portable trainable state adds to a checkpoint: save time and size, on the bundled model.

    python bench/checkpoint_cost.py [--recipe recipes/analogy_lora.yaml] [--out runs/bench_checkpoint_cost]

A 2-step run (one process) saving at step 2; prints the Trainer's own checkpoint time, the extra time of the
portable state (gathering + writing), and both sizes.
"""

import argparse
import shutil
import time
from pathlib import Path

from flexrank.checkpoints import portable_state
from flexrank.config import load_config
from flexrank.training.trainer import FlexTrainer
from flexrank.run import train


def timed(owner, name, seconds: list):
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    setattr(owner, name, wrapper)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", default="recipes/analogy_lora.yaml")
    p.add_argument("--out", default="runs/bench_checkpoint_cost")
    a = p.parse_args()
    shutil.rmtree(a.out, ignore_errors=True)
    cfg = load_config(a.recipe, [f"training.output_dir={a.out}", "training.max_steps=2", "training.save_steps=2",
                                 "training.save_strategy=steps", "training.per_device_train_batch_size=4",
                                 "data.train_size=64", "eval.before=false", "eval.after=false"])
    trainer_save, portable_save = [], []
    timed(FlexTrainer, "_save_checkpoint", trainer_save)  # the Trainer's files + controller state + manifest
    timed(portable_state, "save", portable_save)
    train(cfg)
    folder = Path(a.out) / "checkpoint-2"
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    extra = (folder / portable_state.PORTABLE_FILE).stat().st_size
    print(f"checkpoint: {trainer_save[0]:.3f} s, {(total - extra) / 1e6:.2f} MB; portable state: +{portable_save[0]:.3f} s "
          f"(+{100 * portable_save[0] / trainer_save[0]:.0f}%), +{extra / 1e6:.2f} MB "
          f"(+{100 * extra / (total - extra):.0f}%)")


if __name__ == "__main__":
    main()
