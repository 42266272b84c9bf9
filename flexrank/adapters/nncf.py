"""nncf INT4 quantization-aware training with LoRA adapters absorbed into the quantized weights.

`adapter.method: lora` -> nncf FQ_LORA (one rank); `elastic` -> FQ_LORA_NLS, where flexrank's elastic controller
picks one rank per decoder layer at every optimizer step, as it does for its own rank layers. Every 4-bit Linear
gets a post-hook quantizer on its weight computing fake-quant(W + B@A); `nncf.strip` then packs W + B@A into INT4.
The hook parameters (`__nncf_hooks.*`) are ordinary model parameters, so DDP and the Trainer see them.
`nncf_int4_ptq` is the baseline: float LoRA, merged, then the same compress_weights call in DQ format (no FQ).
All nncf calls of flexrank live here.
"""

import copy
from collections.abc import Callable
import os
import re
from pathlib import Path

import torch

from ..config import RunConfig
from ..controllers.base import RankController, StepPlan
from ..controllers.elastic import ElasticController
from ..elastic.search_space import space_from_nncf, space_from_spec
from ..errors import ConfigError
from ..io import atomic_path
from .export import save_export
from .method import AdapterMethod, save_plain_adapter
from .peft_methods import PeftMethod
from .rank_methods import ElasticMethod, write_elastic_samples

# The int8 backup quantizers JIT-build a C++ extension; on a slow machine that exceeds nncf's 60 s default.
os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")

SCALE_LR_FACTOR = 0.1  # quantizer scales train at lr/10, as nncf's downstream_qat_with_nls example does
INT4_DIR = "int4_model"
SUPERNET_FILE = "nncf_supernet.pt"  # QAT runs: nncf config + hook state (all ranks) + controller state, for eval/export
QAT, PTQ = "nncf_int4", "nncf_int4_ptq"


def _hook_storage(model):
    from nncf.torch.function_hook.wrapper import get_hook_storage

    return get_hook_storage(model)


def _module_name(hook_name: str) -> str:
    """`post_hooks.model:layers:0:mlp:gate_proj:weight__0.0` -> `model.layers.0.mlp.gate_proj`."""
    return re.sub(r"^post_hooks\.", "", hook_name).split(":weight", 1)[0].replace(":", ".")


def lora_quantizers(model) -> dict[str, torch.nn.Module]:
    """Module name -> the 4-bit LoRA quantizer on its weight (8-bit backup quantizers have no adapter)."""
    from nncf.torch.quantization.layers import LoraMixin

    return {_module_name(name): q for name, q in _hook_storage(model).named_hooks()
            if isinstance(q, LoraMixin) and q.num_bits == 4}


def _compress_weights(model, q, sample: dict, compression_format: str, rank: int | None = None):
    """The one nncf.compress_weights call: FQ_LORA / FQ_LORA_NLS for QAT, DQ (packed INT4) for post-training."""
    import nncf
    from nncf.parameters import CompressionFormat, CompressWeightsMode
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters

    return nncf.compress_weights(
        model, mode=CompressWeightsMode(q.mode), group_size=q.group_size,
        dataset=nncf.Dataset([{k: sample[k] for k in ("input_ids", "attention_mask") if k in sample}]),
        compression_format=CompressionFormat[compression_format],
        advanced_parameters=AdvancedCompressionParameters(lora_adapter_rank=rank) if rank else None,
        backup_mode=nncf.BackupMode.NONE if q.backup == "none" else nncf.BackupMode.INT8_ASYM)


def compress(model, cfg: RunConfig, sample: dict):
    """Insert the FQ_LORA / FQ_LORA_NLS quantizers (nncf traces the model on `sample`) and make only their
    adapters and scales trainable."""
    fmt = "FQ_LORA_NLS" if cfg.adapter.method == "elastic" else "FQ_LORA"
    model = _compress_weights(model, cfg.model.quantization, sample, fmt, cfg.adapter.r)
    model.requires_grad_(False)
    for quantizer in lora_quantizers(model).values():
        quantizer.enable_gradients()
    return model


def compress_merged(peft_model, cfg: RunConfig, sample: dict):
    """The post-training baseline: a copy of the float LoRA model with the adapter merged into the base, then
    INT4 weight compression with the same mode / group size / backup as QAT, without fake quantizers."""
    merged = copy.deepcopy(peft_model).merge_and_unload()
    return _compress_weights(merged, cfg.model.quantization, sample, "DQ").eval()


def trainable_groups(model, lr: float) -> list[dict]:
    """Adapters at `lr`, quantizer scales at lr/10, no weight decay (nncf's example)."""
    adapters, scales = [], []
    for quantizer in lora_quantizers(model).values():
        own = quantizer.get_adapters()
        adapters += list(own.values())
        scales += [p for name, p in quantizer.get_trainable_params().items() if name not in own]
    return [{"params": adapters, "lr": lr, "weight_decay": 0.0},
            {"params": scales, "lr": lr * SCALE_LR_FACTOR, "weight_decay": 0.0}]


class QuantizerRankLayer:
    """Lets flexrank's controllers drive an nncf NLS quantizer like a rank layer: `set_width` calls
    `set_active_rank`, and `lora_rank_mask` mirrors the active prefix (read by reports and active_rank)."""

    def __init__(self, quantizer):
        self.quantizer = quantizer
        self.out_features, self.in_features = quantizer.lora_B.shape[0], quantizer.lora_A.shape[1]
        self.lora_rank_mask = {"default": torch.ones(quantizer.lora_A.shape[0])}

    def set_width(self, width: int, adapter: str = "default") -> None:
        self.quantizer.set_active_rank(width)
        self.lora_rank_mask[adapter] = (torch.arange(len(self.lora_rank_mask[adapter])) < width).float()


class _NncfState:
    """Optimizer groups and checkpoint state shared by both nncf controllers. The checkpoint carries the nncf
    config (where the quantizers sit) and the hook storage state, so a resume restores them exactly."""

    def _init_nncf(self, model, lr: float):
        self.model, self.lr = model, lr
        allow_config_globals()  # checkpoints' controller state loads with weights_only=True

    def optimizer_groups(self, model) -> list[dict]:
        return trainable_groups(self.model, self.lr)

    def nncf_state(self) -> dict:
        import nncf.torch

        return {"nncf_config": nncf.torch.get_config(self.model),
                "nncf_state_dict": _hook_storage(self.model).state_dict()}

    def load_nncf_state(self, state: dict) -> None:
        if "nncf_state_dict" in state:
            _hook_storage(self.model).load_state_dict(state["nncf_state_dict"])


class NncfLoraController(_NncfState, RankController):
    """FQ_LORA: one fixed rank; only optimizer groups and state."""

    def __init__(self, model, lr: float):
        RankController.__init__(self, {n: QuantizerRankLayer(q) for n, q in lora_quantizers(model).items()})
        self._init_nncf(model, lr)

    def state_dict(self) -> dict:
        return self.nncf_state()

    def load_state_dict(self, state: dict) -> None:
        self.load_nncf_state(state)


class NncfElasticController(_NncfState, ElasticController):
    """FQ_LORA_NLS: flexrank's elastic controller (stages, (seed, step) sampling, named subnets) on nncf quantizers."""

    def __init__(self, model, space, lr: float, **kwargs):
        layers = {n: QuantizerRankLayer(q) for n, q in lora_quantizers(model).items()}
        self._init_nncf(model, lr)
        ElasticController.__init__(self, layers, space, **kwargs)

    def state_dict(self) -> dict:
        return {**ElasticController.state_dict(self), **self.nncf_state()}

    def load_state_dict(self, state: dict) -> None:
        self.load_nncf_state(state)
        ElasticController.load_state_dict(self, state)


def build_controller(cfg: RunConfig, model, plan: StepPlan) -> RankController:
    if cfg.adapter.method != "elastic":
        return NncfLoraController(model, plan.learning_rate)
    e = cfg.adapter.elastic
    names = list(lora_quantizers(model))
    space = (space_from_nncf(e.nncf_config, names, cfg.adapter.r) if e.nncf_config
             else space_from_spec(e.search_space, names, cfg.adapter.r, key="adapter.elastic.search_space"))
    seed = e.seed if e.seed is not None else plan.seed
    return NncfElasticController(model, space, plan.learning_rate, seed=seed, steps_per_epoch=plan.steps_per_epoch,
                                 sandwich=e.sandwich)


def strip_int4(model, example_input: dict):
    """A copy with the adapters absorbed and the weights packed to INT4 (uint8 + nncf decompressor hooks)."""
    import nncf

    return nncf.strip(copy.deepcopy(model), do_copy=False, strip_format=nncf.StripFormat.DQ,
                      example_input=example_input)


def export_int4(model, tokenizer, out: Path, example_input: dict) -> dict:
    """The QAT model stripped (`strip_int4`) and saved by `save_int4`."""
    return save_int4(strip_int4(model, example_input), tokenizer, out / INT4_DIR)


def save_int4(int4_model, tokenizer, folder: Path) -> dict:
    """Write `folder/model.pt` (the whole packed INT4 module; reload with `load_int4` or
    `torch.load(path, weights_only=False)`, which needs torch, transformers and nncf but not flexrank) and the
    tokenizer beside it. Written to a temporary file first, so a crash never leaves a half-written model."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.pt"
    with atomic_path(path) as tmp:
        torch.save(int4_model, tmp)
    tokenizer.save_pretrained(folder)
    return {"int4_model": str(path), "int4_model_bytes": path.stat().st_size}


def load_int4(path: str | Path):
    """The exported INT4 model (a plain transformers model with nncf decompressor hooks), in eval mode."""
    import nncf  # noqa: F401  (the pickled decompressor hooks are nncf classes)

    return torch.load(path, weights_only=False, map_location="cpu").eval()


def allow_config_globals() -> None:
    """nncf's config holds this enum: allowed, so its state loads with weights_only=True."""
    from nncf.common.quantization.structs import QuantizationScheme

    torch.serialization.add_safe_globals([QuantizationScheme])


def save_supernet(controller, path: Path) -> None:
    """QAT runs: everything `load_qat_run` needs to rebuild the fake-quantized model with all its ranks."""
    with atomic_path(path) as tmp:
        torch.save(controller.state_dict(), tmp)


def example_input(tokenizer) -> dict:
    """Any tokens do for tracing: nncf names its hooks by module, not by shape."""
    return {"input_ids": tokenizer("flexrank", return_tensors="pt")["input_ids"]}


def load_qat_run(cfg: RunConfig, run_dir: Path, model, plan: StepPlan):
    """(fake-quantized model, controller) of a finished QAT run: nncf's quantizers rebuilt from the saved config,
    their adapters and scales loaded; an elastic run's controller can then activate any subnet."""
    import nncf.torch

    allow_config_globals()
    state = torch.load(run_dir / SUPERNET_FILE, weights_only=True)
    model = nncf.torch.load_from_config(model, state["nncf_config"]).eval()
    controller = build_controller(cfg, model, plan)
    controller.load_state_dict(state)
    return model, controller


class _Int4Model:
    """What the nncf methods share: the run's model is one INT4 model (`int4_model/`), exported whole."""
    model_dir = INT4_DIR

    def check_export(self, out, compact, merge_sparse) -> None:
        if merge_sparse:
            raise ConfigError("--merge-sparse", merge_sparse, "no --merge-sparse with an nncf INT4 run",
                              "the adapters are already absorbed into the INT4 weights, and nncf runs have no sparse "
                              "base")
        if compact or not out:
            raise ConfigError("--compact", compact, "--out DIR only with an nncf INT4 run",
                              "its INT4 weights are packed per group: nothing to slice")

    def int4_model(self, tokenizer):
        return self.model

    def export_adapter(self, out, full_state: dict | None = None, tokenizer=None) -> dict:
        summary = {}
        model = self.int4_model(tokenizer)
        save_export(out, lambda folder: summary.update(save_int4(model, tokenizer, folder)), {})
        return {**summary, "int4_model": str(Path(out) / "model.pt")}  # written in a temporary folder, then moved


class _Qat(_Int4Model):
    """INT4 QAT: the adapters live in nncf's weight quantizers, not in peft; the run keeps the whole supernet
    (nncf config, hook state, controller state) beside the exported INT4 model."""

    def build(self, base_model, plan: StepPlan, sample) -> None:
        self.sample = sample()
        self.model = compress(base_model, self.cfg, self.sample)
        self.controller = build_controller(self.cfg, self.model, plan)

    def save_trained_state(self, out: Path, full_state: dict) -> None:
        """Nothing yet: the supernet is nncf's own file, written with the INT4 model in save()."""

    def save(self, out: Path, full_state: dict, tokenizer, metrics: dict) -> None:
        metrics["export"] = export_int4(self.model, tokenizer, out, {"input_ids": self.sample["input_ids"]})
        save_supernet(self.controller, out / SUPERNET_FILE)

    def load(self, run_dir: Path, base_model: Callable, plan_of: Callable[[], StepPlan]) -> None:
        self.model, self.controller = load_qat_run(self.cfg, run_dir, base_model(), plan_of())

    def int4_model(self, tokenizer):
        return strip_int4(self.model, example_input(tokenizer))


class NncfLoraQat(_Qat, AdapterMethod):
    """`method: lora` + `nncf_int4`: nncf FQ_LORA, one rank."""


class NncfElasticQat(_Qat, ElasticMethod):
    """`method: elastic` + `nncf_int4`: FQ_LORA_NLS, flexrank's elastic controller on nncf's quantizers (adapter
    ranks only: no base widths, and no size report, as the cost model counts rank layers)."""

    def evaluate_after(self, evaluate, main: bool) -> dict:
        return self.evaluate_subnets(evaluate, main)

    def save(self, out: Path, full_state: dict, tokenizer, metrics: dict) -> None:
        _Qat.save(self, out, full_state, tokenizer, metrics)
        write_elastic_samples(self.controller, out)

    def base_widths(self) -> dict:
        return {}


class NncfPtq(_Int4Model, PeftMethod):
    """`nncf_int4_ptq`, the baseline: float LoRA trained, merged, then INT4 post-training compression."""

    def build(self, base_model, plan: StepPlan, sample) -> None:
        self.sample = sample()
        super().build(base_model, plan, sample)

    def evaluate_after(self, evaluate, main: bool) -> dict:
        self.int4 = compress_merged(self.model, self.cfg, self.sample)
        if not self.cfg.eval.after:
            return {}
        return {"after_float": evaluate(self.model), "after": evaluate(self.int4)}

    def save(self, out: Path, full_state: dict, tokenizer, metrics: dict) -> None:
        metrics["export"] = save_plain_adapter(self.model, out / "adapter", full_state)  # the float adapter, and
        metrics["export"].update(save_int4(self.int4, tokenizer, out / INT4_DIR))     # the INT4 model

    def load(self, run_dir: Path, base_model: Callable, plan_of: Callable[[], StepPlan]) -> None:
        self.model = load_int4(run_dir / INT4_DIR / "model.pt")
