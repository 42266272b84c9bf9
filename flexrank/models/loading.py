"""Build the base model (dtype, attention kernel, QLoRA) and its tokenizer."""

import torch
from peft import prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from .assets import resolve_model
from ..config import ModelConfig
from ..errors import ConfigError
from . import hub_kernels
from .kernels import VARLEN, choose_attention, expected_varlen_backend


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _bitsandbytes(cfg: ModelConfig) -> bool:
    return cfg.quantization is not None and cfg.quantization.method == "bitsandbytes"


def _quantization(cfg: ModelConfig):
    if not _bitsandbytes(cfg):  # nncf_int4 quantizes after loading (adapters/nncf.py)
        return {}
    from transformers import BitsAndBytesConfig

    q = cfg.quantization
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=_dtype(q.bnb_4bit_compute_dtype),
            bnb_4bit_quant_storage=_dtype(q.bnb_4bit_quant_storage)),
        "device_map": {"": device},
    }


def _model_path(cfg: ModelConfig):
    """The model's local folder; refuses one that only loads by running its own code unless the recipe allows it
    (transformers would otherwise fail with a multi-line error, or, asked, execute code the user never saw)."""
    import json

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = resolve_model(cfg.name_or_path, cfg.revision)
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if not cfg.trust_remote_code and model_type is not None and model_type not in CONFIG_MAPPING:
        raise ConfigError("model.trust_remote_code", False, "true for a model that ships its own modelling code",
                          f"model_type {model_type!r} is not in transformers; only if you trust the code in {path}")
    return path


def load_tokenizer(cfg: ModelConfig):
    tok = AutoTokenizer.from_pretrained(_model_path(cfg), trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(cfg: ModelConfig, tokenizer, log=print, packing: bool = False):
    """The frozen base model, with the attention kernel chosen at run time for the batches it will see (packed rows
    or not) and the Hub-kernel decision; the log says both."""
    path = _model_path(cfg)
    attn, why = choose_attention(cfg.attn_implementation, cfg.dtype, packing=packing)
    if attn == VARLEN:
        from . import varlen

        varlen.register()
        varlen.announce(expected_varlen_backend(cfg.dtype)[0])
    log(f"[flexrank] attention kernel: {attn} ({why})")
    # transformers 5.x would kernelise the model with kernels fetched from the Hub (use_kernels defaults to True):
    # only where the user asked (USE_HUB_KERNELS=YES; see hub_kernels.py).
    kwargs = {"dtype": _dtype(cfg.dtype), "attn_implementation": attn, "trust_remote_code": cfg.trust_remote_code,
              "use_kernels": hub_kernels.allowed(), **_quantization(cfg)}
    if cfg.task_type == "seq_cls":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=cfg.num_labels, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    log(f"[flexrank] hub kernels: {hub_kernels.decision()}")
    model.config.pad_token_id = tokenizer.pad_token_id
    if _bitsandbytes(cfg):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def count_parameters(model) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": int(trainable), "total": int(sum(p.numel() for p in model.parameters()))}
