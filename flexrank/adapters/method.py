"""The interface every adapter method implements (LoRA family, elastic, AdaLoRA, SoRA, nncf INT4): it builds its
adapter and controller on a base model and answers what a run, `flexrank eval`, `export` and `search` need, so
those hold no method-specific branches. A new method is one subclass and one line in registry.py."""

from collections.abc import Callable
from pathlib import Path

from ..config import RunConfig
from ..controllers.base import RankController, StepPlan
from .export import NothingToExport, export_plain_adapter


class AdapterMethod:
    model_dir = "adapter"   # what a finished run holds as its trained model (relative to the run folder)
    output_folders: tuple[str, ...] = ("adapter",)  # every folder a run of this method writes (and replaces)
    has_subnets = False     # whether any subnet can be activated, evaluated, searched and exported

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.model = None  # the trainable model (peft or nncf-compressed), once built or loaded
        self.controller: RankController | None = None
        self.resume_from: Path | None = None  # the checkpoint a resumed training continues from (set before build)

    # --- training
    def build(self, base_model, plan: StepPlan, sample: Callable[[], dict]) -> None:
        """Wrap `base_model` with the adapter and make its controller. `sample()` is one collated training record
        (nncf traces the model on it); `sample(n, start)` the training records start.. start+n-1 as one batch, None
        past the end (calibration: importance-ordered base widths)."""
        raise NotImplementedError

    def callbacks(self, evaluate_loss: Callable[[], dict], metrics: dict) -> list:
        """TrainerCallbacks of the method (e.g. SoRA's held-out loss at each stage), reporting into `metrics`."""
        return []

    def evaluate_after(self, evaluate: Callable[[object], dict], main: bool) -> dict:
        """The after-training metrics (`evaluate(model)` is one evaluation phase, on every process)."""
        return {"after": evaluate(self.model)} if self.cfg.eval.after else {}

    def save_trained_state(self, out: Path, full_state: dict) -> None:
        """Main process, as training ends (before the after-training evaluation switches subnets): whatever
        reloads the whole trained state for eval, export and search, beyond the exported model."""

    def save(self, out: Path, full_state: dict, tokenizer, metrics: dict) -> None:
        """Main process, after training: the run's model (a plain peft adapter by default) and what reloads it;
        `metrics["export"]` says what was written."""
        metrics["export"] = save_plain_adapter(self.model, out / "adapter", full_state, self.plain_state_transform())

    # --- a finished run (flexrank eval / export / search)
    def load(self, run_dir: Path, base_model: Callable, plan_of: Callable[[], StepPlan]) -> None:
        """Rebuild the trained model of a finished run: `base_model()` loads the base and `plan_of()` builds the
        step plan, each only if the method needs it (an INT4 model needs neither)."""
        from peft import PeftModel

        self.model = PeftModel.from_pretrained(base_model(), run_dir / self.model_dir)

    def activate(self, subnet) -> dict | None:
        """Switch the model to `subnet` (elastic runs); None where the method has a single network."""
        return None

    def subnets_to_evaluate(self, requested: list | None) -> list:
        return [None]

    def base_widths(self) -> dict:
        """Per-layer base widths of the active subnet (for the compact export); {} where the base is whole."""
        return {}

    def check_export(self, out, compact, merge_sparse) -> None:
        """Refuse an export this method cannot write, before any weight loads."""

    def export_adapter(self, out, full_state: dict | None = None, tokenizer=None) -> dict:
        """The active (sub)network as a plain peft LoRA adapter in `out` (NothingToExport when no rank is left)."""
        return export_plain_adapter(self.model, out, full_state=full_state, transform=self.plain_state_transform())

    def plain_state_transform(self) -> Callable[[dict], dict] | None:
        """What maps the plain adapter state to the stock base it is loaded on (None: nothing to map)."""
        return None


def save_plain_adapter(model, folder: Path, full_state: dict, transform=None) -> dict:
    """A finished training's adapter as plain peft LoRA. When every rank was pruned there is nothing to write:
    said, not raised (training itself finished: its metrics and rank report are kept; a placeholder adapter with
    a zero update would pass for a trained one downstream)."""
    try:
        return export_plain_adapter(model, folder, full_state=full_state, transform=transform)
    except NothingToExport as exc:
        print(f"[flexrank] no adapter written: {exc}")
        return {"error": str(exc), "modules": 0, "total_rank": 0, "params": 0, "rank_pattern": {}}
