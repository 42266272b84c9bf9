"""nncf INT4 quantization-aware training with LoRA adapters absorbed into the quantized weights.

`adapter.method: lora` -> nncf FQ_LORA (one rank); `elastic` -> FQ_LORA_NLS, where flexrank's elastic controller
picks one rank per decoder layer at every optimizer step, as it does for its own rank layers. Every 4-bit Linear
gets a post-hook quantizer on its weight computing fake-quant(W + B@A); `nncf.strip` then packs W + B@A into INT4.
The hook parameters (`__nncf_hooks.*`) are ordinary model parameters, so DDP and the Trainer see them.
`nncf_int4_ptq` is the baseline: float LoRA, merged, then the same compress_weights call in DQ format (no FQ).
All nncf calls of flexrank live here; the undocumented nncf internals they rely on are in nncf_internals.py.
"""

import copy
from collections.abc import Callable
import os
from pathlib import Path

import torch

from ..config import RunConfig
from ..controllers.base import RankController, StepPlan
from ..controllers.elastic import ElasticController
from ..elastic.search_space import space_from_nncf, space_from_spec
from ..errors import ConfigError
from ..io import atomic_path, file_sha256, mark_owned, write_json
from ..models.kernels import VARLEN
from ..training.transformers_internals import attention_kernel
from .export import save_export
from .method import AdapterMethod, save_plain_adapter
from .nncf_internals import (
    allow_config_globals,
    build_decompressor,
    decompressor_spec,
    dtype_name,
    hook_storage,
    lora_quantizers,
    with_decompressors,
)
from .peft_methods import PeftMethod
from .rank_methods import ElasticMethod, write_elastic_samples

# The int8 backup quantizers JIT-build a C++ extension; on a slow machine that exceeds nncf's 60 s default.
os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")

SCALE_LR_FACTOR = 0.1  # quantizer scales train at lr/10, as nncf's downstream_qat_with_nls example does
INT4_DIR = "int4_model"
SUPERNET_FILE = "nncf_supernet.pt"  # QAT runs: nncf config + hook state (all ranks) + controller state, for eval/export
QAT, PTQ = "nncf_int4", "nncf_int4_ptq"


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
                "nncf_state_dict": hook_storage(self.model).state_dict()}

    def load_nncf_state(self, state: dict) -> None:
        if "nncf_state_dict" in state:
            hook_storage(self.model).load_state_dict(state["nncf_state_dict"])


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


# The INT4 model on disk: tensors only, nothing unpickled on load. nncf's own `get_config` serializes only its
# trainable (StatefulModuleInterface) hooks, not the decompressors `strip`/`compress_weights` leave, so flexrank
# records each decompressor's constructor arguments itself, in JSON, next to transformers' config.json.
INT4_FILE = "model.safetensors"    # every tensor: packed INT4/INT8 weights, decompressor scales, float layers
INT4_CONFIG = "int4_config.json"   # how to rebuild the module around them (written last: the folder is complete)
LEGACY_INT4_FILE = "model.pt"      # flexrank < this format: a pickled nn.Module, refused (loading it runs code)
INT4_FORMAT = "flexrank-nncf-int4/1"
def _dtype(name: str | None, where: Path) -> torch.dtype | None:
    dtype = None if name is None else getattr(torch, str(name), None)
    if name is not None and not isinstance(dtype, torch.dtype):
        raise _bad_int4(where, f"unknown dtype {name!r}")
    return dtype


def save_int4(int4_model, tokenizer, folder: Path) -> dict:
    """Write the packed INT4 model into `folder` without pickle: `model.safetensors` (all its tensors),
    `int4_config.json` (architecture, dtype, attention kernel, each nncf decompressor hook and packed weight),
    transformers' `config.json` / `generation_config.json`, and the tokenizer. Reload with `load_int4(folder)`.
    Each file is written to a temporary file first; the JSON, written last, holds the tensors' sha256, so a crash
    between the two leaves a folder that is refused, never a mismatched model."""
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mark_owned(folder)  # a run's int4_model/ (checked up front: refuse_foreign), or a fresh export folder
    spec = {
        "format": INT4_FORMAT,
        "architecture": type(int4_model).__name__,
        "dtype": dtype_name(int4_model.dtype),
        "attn_implementation": attention_kernel(int4_model),
        "decompressors": [decompressor_spec(name, hook) for name, hook in hook_storage(int4_model).named_hooks()],
        "packed_weights": {name: {"dtype": dtype_name(p.dtype), "shape": list(p.shape)}
                           for name, p in int4_model.named_parameters() if not p.is_floating_point()},
    }
    path = folder / INT4_FILE
    with atomic_path(path) as tmp:
        save_model(int4_model, str(tmp), metadata={"format": INT4_FORMAT})
    spec["sha256"] = file_sha256(path)
    int4_model.config.save_pretrained(folder)
    if int4_model.generation_config is not None:
        int4_model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_json(folder / INT4_CONFIG, spec)
    return {"int4_model": str(folder), "int4_model_bytes": path.stat().st_size}


def _bad_int4(folder: Path, why: str) -> ConfigError:
    return ConfigError("int4_model", str(folder), f"a folder written by flexrank's save_int4 ({INT4_FILE} + "
                       f"{INT4_CONFIG})", why)


def _refuse_unreadable(folder: Path) -> None:
    """A folder without the JSON: an old pickled model.pt is refused unread (unpickling runs any code it holds)."""
    if (folder / LEGACY_INT4_FILE).exists():
        raise ConfigError(
            "int4_model", str(folder / LEGACY_INT4_FILE), f"an INT4 model saved as {INT4_FILE} + {INT4_CONFIG}",
            "a pickled model.pt from an older flexrank is never loaded, since unpickling can run code; re-create "
            "it with this flexrank: `flexrank export RUN_DIR --out DIR` for a QAT run (nncf_int4), or train a "
            "post-training run (nncf_int4_ptq) again: `flexrank train RUN_DIR/config.yaml`")
    raise _bad_int4(folder, f"no {INT4_CONFIG} in it")


def load_int4(folder: str | Path):
    """The INT4 model `save_int4` wrote in `folder` (a transformers model with nncf decompressor hooks), in eval
    mode: the architecture built from config.json (random weights, no download, no model code run), the hooks
    from int4_config.json, then every tensor from model.safetensors, strictly (no key missing or left over, same
    shapes and dtypes). Anything else is a ConfigError naming the folder."""
    import json

    folder = Path(folder)
    if not (folder / INT4_CONFIG).is_file():
        _refuse_unreadable(folder)
    try:
        spec = json.loads((folder / INT4_CONFIG).read_text())
    except ValueError as exc:
        raise _bad_int4(folder, f"{INT4_CONFIG} is not JSON: {exc}") from None
    if not isinstance(spec, dict) or spec.get("format") != INT4_FORMAT:
        raise _bad_int4(folder, f"{INT4_CONFIG} is not format {INT4_FORMAT!r}")
    path = folder / INT4_FILE
    if not path.is_file() or file_sha256(path) != spec.get("sha256"):
        raise _bad_int4(folder, f"{INT4_FILE} is missing or is not the file {INT4_CONFIG} was written for")
    try:
        return _rebuild_int4(folder, spec, path)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, OSError) as exc:
        if isinstance(exc, ConfigError):
            raise
        said = " ".join(str(exc).split())  # one line
        raise _bad_int4(folder, f"{type(exc).__name__}: {said[:400]}") from exc


def _rebuild_int4(folder: Path, spec: dict, path: Path):
    from safetensors.torch import load_file, load_model
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    if spec["attn_implementation"] == VARLEN:  # flexrank's own attention for packed rows: registered on use
        from ..models import varlen

        varlen.register()
    model = AutoModelForCausalLM.from_config(config, dtype=_dtype(spec["dtype"], folder),
                                             attn_implementation=spec["attn_implementation"], trust_remote_code=False)
    if type(model).__name__ != spec["architecture"]:
        raise _bad_int4(folder, f"config.json builds a {type(model).__name__}, not a {spec['architecture']}")
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    for name, packed in spec["packed_weights"].items():  # .data, so a tied weight stays tied
        param = model.get_parameter(name)
        param.requires_grad_(False)
        param.data = torch.empty(packed["shape"], dtype=_dtype(packed["dtype"], folder))
    try:
        hooks = {h["hook"]: build_decompressor(h, lambda name: _dtype(name, folder)) for h in spec["decompressors"]}
    except ConfigError:
        raise
    except ValueError as exc:  # an unknown decompressor class
        raise _bad_int4(folder, str(exc)) from None
    model = with_decompressors(model, hooks)
    rebuilt = model.state_dict()
    wrong = [k for k, v in load_file(path).items() if k in rebuilt and rebuilt[k].dtype != v.dtype]  # mmap: lazy
    if wrong:  # load_state_dict would cast silently
        raise _bad_int4(folder, f"{wrong[0]} is stored as a different dtype than the rebuilt model's")
    load_model(model, str(path), strict=True)  # shapes, missing and unexpected keys (tied weights stored once)
    return model.eval()


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
    output_folders = (INT4_DIR,)

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
        return {**summary, "int4_model": str(Path(out))}  # written in a temporary folder, then moved


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
    output_folders = ("adapter", INT4_DIR)  # the float adapter stays available

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
        self.model = load_int4(run_dir / INT4_DIR)
