"""Which method object a recipe names, and a finished run rebuilt through it (for eval, export and search).
Adding a method: its class, and one line in METHODS."""

from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig, load_config
from .method import AdapterMethod
from .nncf import NncfElasticQat, NncfLoraQat, NncfPtq
from .peft_methods import PeftMethod
from .rank_methods import AdaLoRAMethod, ElasticMethod, SoRAMethod

SPARSE_BASE = "sparse_base"  # a Shears run's Wanda-pruned base, which its adapter belongs to

# (quantizer that changes how the adapter is trained, or None, adapter.method) -> the method's class
METHODS: dict[tuple[str | None, str], type[AdapterMethod]] = {
    (None, "lora"): PeftMethod,
    (None, "dora"): PeftMethod,
    (None, "rslora"): PeftMethod,
    (None, "miss"): PeftMethod,
    (None, "bat"): PeftMethod,
    (None, "elastic"): ElasticMethod,
    (None, "adalora"): AdaLoRAMethod,
    (None, "sora"): SoRAMethod,
    ("nncf_int4", "lora"): NncfLoraQat,
    ("nncf_int4", "elastic"): NncfElasticQat,
    ("nncf_int4_ptq", "lora"): NncfPtq,
}


def method_for(cfg: RunConfig) -> AdapterMethod:
    """bitsandbytes quantizes the base only (any method trains on it as on a float base); nncf changes the method."""
    q = cfg.model.quantization
    key = (q.method if q is not None else None, cfg.adapter.method)
    return METHODS.get(key, METHODS.get((None, cfg.adapter.method)))(cfg)


@dataclass
class FinishedRun:
    cfg: RunConfig
    tokenizer: object
    method: AdapterMethod

    @property
    def model(self):
        return self.method.model

    @property
    def controller(self):
        return self.method.controller


def load_run(run_dir: str | Path, overrides: list[str] = ()) -> FinishedRun:
    """A finished run's config, tokenizer and method with its trained model (and controller) rebuilt."""
    from ..data.pipeline import load_data, tokenize_train
    from ..models.loading import load_base_model, load_tokenizer
    from ..training.arguments import inspection_overrides, step_plan, training_arguments

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml", overrides)
    if (run_dir / SPARSE_BASE).exists():
        cfg.model.name_or_path = str(run_dir / SPARSE_BASE)
    tokenizer = load_tokenizer(cfg.model)
    method = method_for(cfg)

    def plan():
        n_train = len(tokenize_train(cfg, tokenizer, load_data(cfg)).dataset)
        return step_plan(training_arguments(cfg, inspection_overrides(), log=False), n_train)

    method.load(run_dir, lambda: load_base_model(cfg.model, tokenizer), plan)
    return FinishedRun(cfg, tokenizer, method)
