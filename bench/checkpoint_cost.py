"""What the portable trainable state adds to a checkpoint: save time and size, on the bundled model.

    python bench/checkpoint_cost.py [--recipe recipes/analogy_lora.yaml] [--out runs/bench_checkpoint_cost]

A 2-step run (one process) saving at step 2; prints the Trainer's own checkpoint time, the extra time of the
portable state (gathering + writing), and both sizes.
"""

import argparse
import time
from pathlib import Path

from transformers import TrainerCallback

import flexrank.run
from flexrank.checkpoints import portable_state
from flexrank.config import load_config
from flexrank.errors import ConfigError
from flexrank.io import output_folder
from flexrank.training.trainer import FlexTrainer


class Clock(TrainerCallback):
    """The Trainer's own checkpoint time through public hooks only: from the end of the saving step (the last
    on_step_end callback, after the flow callback asked for a save) to the start of flexrank's first on_save work
    (portable_state.save), which runs once the Trainer's files are written."""

    def __init__(self):
        self.step_end, self.portable = None, []

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            self.step_end = time.perf_counter()


def timed_portable_save(clock: Clock):
    save = portable_state.save

    def wrapper(trainer, folder):
        start = time.perf_counter()
        save(trainer, folder)
        clock.portable.append((start, time.perf_counter() - start))

    return wrapper


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", default="recipes/analogy_lora.yaml")
    p.add_argument("--out", default="runs/bench_checkpoint_cost")
    a = p.parse_args()
    try:
        with output_folder(a.out, "--out"):  # a fresh, marked run folder; a folder flexrank did not write is refused
            pass
    except ConfigError as exc:
        raise SystemExit(f"[flexrank] {exc}") from None
    cfg = load_config(a.recipe, [f"training.output_dir={a.out}", "training.max_steps=2", "training.save_steps=2",
                                 "training.save_strategy=steps", "training.per_device_train_batch_size=4",
                                 "data.train_size=64", "eval.before=false", "eval.after=false"])
    clock = Clock()

    class ClockedTrainer(FlexTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(clock)

    flexrank.run.FlexTrainer = ClockedTrainer
    portable_state.save = timed_portable_save(clock)
    flexrank.run.train(cfg)
    (portable_start, portable_seconds), = clock.portable
    trainer_seconds = portable_start - clock.step_end
    folder = Path(a.out) / "checkpoint-2"
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    extra = (folder / portable_state.PORTABLE_FILE).stat().st_size
    print(f"checkpoint: {trainer_seconds:.3f} s, {(total - extra) / 1e6:.2f} MB; portable state: +{portable_seconds:.3f} s "
          f"(+{100 * portable_seconds / trainer_seconds:.0f}%), +{extra / 1e6:.2f} MB "
          f"(+{100 * extra / (total - extra):.0f}%)")


if __name__ == "__main__":
    main()
