"""nncf INT4 quantization-aware training with LoRA adapters absorbed into the quantized weights.

`adapter.method: lora` -> nncf FQ_LORA (one rank); `elastic` -> FQ_LORA_NLS, where flexrank's elastic controller
picks one rank per decoder layer at every optimizer step, as it does for its own rank layers. Every 4-bit Linear
gets a post-hook quantizer on its weight computing fake-quant(W + B@A); `nncf.strip` then packs W + B@A into INT4.
The hook parameters (`__nncf_hooks.*`) are ordinary model parameters, so DDP and the Trainer see them.
"""

import copy
import os
import re
from pathlib import Path

import torch

from .config import RunConfig
from .controllers.base import RankController
from .controllers.elastic import ElasticController
from .search_space import space_from_nncf, space_from_spec

# The int8 backup quantizers JIT-build a C++ extension; on a slow machine that exceeds nncf's 60 s default.
os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")

SCALE_LR_FACTOR = 0.1  # quantizer scales train at lr/10, as nncf's downstream_qat_with_nls example does
INT4_DIR = "int4_model"


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


def compress(model, cfg: RunConfig, sample: dict):
    """Insert the FQ_LORA / FQ_LORA_NLS quantizers (nncf traces the model on `sample`) and make only their
    adapters and scales trainable."""
    import nncf
    from nncf.parameters import CompressionFormat, CompressWeightsMode
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters

    q = cfg.model.quantization
    elastic = cfg.adapter.method == "elastic"
    model = nncf.compress_weights(
        model, mode=CompressWeightsMode(q.mode), group_size=q.group_size,
        dataset=nncf.Dataset([{k: sample[k] for k in ("input_ids", "attention_mask")}]),
        compression_format=CompressionFormat.FQ_LORA_NLS if elastic else CompressionFormat.FQ_LORA,
        advanced_parameters=AdvancedCompressionParameters(lora_adapter_rank=cfg.adapter.r),
        backup_mode=nncf.BackupMode.NONE if q.backup == "none" else nncf.BackupMode.INT8_ASYM)
    model.requires_grad_(False)
    for quantizer in lora_quantizers(model).values():
        quantizer.enable_gradients()
    return model


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
        from nncf.common.quantization.structs import QuantizationScheme

        self.model, self.lr = model, lr
        # nncf's config holds this enum: allowed, so checkpoints' controller state loads with weights_only=True.
        torch.serialization.add_safe_globals([QuantizationScheme])

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


def build_controller(cfg: RunConfig, model, steps_per_epoch: int) -> RankController:
    lr = cfg.training["learning_rate"]
    if cfg.adapter.method != "elastic":
        return NncfLoraController(model, lr)
    e = cfg.adapter.elastic
    names = list(lora_quantizers(model))
    space = (space_from_nncf(e.nncf_config, names, cfg.adapter.r) if e.nncf_config
             else space_from_spec(e.search_space, names, cfg.adapter.r, key="adapter.elastic.search_space"))
    seed = e.seed if e.seed is not None else cfg.training["seed"]
    return NncfElasticController(model, space, lr, seed=seed, steps_per_epoch=steps_per_epoch, sandwich=e.sandwich)


def strip_int4(model, example_input: dict):
    """A copy with the adapters absorbed and the weights packed to INT4 (uint8 + nncf decompressor hooks)."""
    import nncf

    return nncf.strip(copy.deepcopy(model), do_copy=False, strip_format=nncf.StripFormat.DQ,
                      example_input=example_input)


def export_int4(model, tokenizer, out: Path, example_input: dict) -> dict:
    """Write `out/int4_model/model.pt` (the whole stripped module; reload with
    `torch.load(path, weights_only=False)`, which needs torch, transformers and nncf but not flexrank) and the
    tokenizer beside it. Written to a temporary file first, so a crash never leaves a half-written model."""
    folder = out / INT4_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stripped = strip_int4(model, example_input)
    path = folder / "model.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save(stripped, tmp)
    os.replace(tmp, path)
    tokenizer.save_pretrained(folder)
    return {"int4_model": str(path), "int4_model_bytes": path.stat().st_size}


def load_int4(path: str | Path):
    """The exported INT4 model (a plain transformers model with nncf decompressor hooks), in eval mode."""
    import nncf  # noqa: F401  (the pickled decompressor hooks are nncf classes)

    return torch.load(path, weights_only=False, map_location="cpu").eval()
