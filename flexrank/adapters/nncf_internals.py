"""nncf's undocumented internals flexrank relies on, in one place: where nncf keeps the hooks it inserts (the hook
storage of a wrapped model, hook names that encode the module path), which hooks are 4-bit LoRA quantizers, the
weight decompressors a stripped model carries (their classes, constructor arguments and tensors, saved without
pickle by adapters/nncf.py), and the enum nncf's config holds. `private_api_problems()` checks them by behaviour
on a tiny compressed model and names the nncf version when an upgrade changes one (tests/test_internals.py).
"""

import re
from importlib.metadata import version

import torch

DECOMPRESSOR_MODULE = "nncf.torch.quantization.layers"
# nncf decompressor class -> its constructor's arguments (tensors are rebuilt as zeros by shape, then loaded)
DECOMPRESSORS = {
    "INT4AsymmetricWeightsDecompressor": ("scale", "zero_point", "compressed_weight_shape", "result_shape",
                                          "result_dtype"),
    "INT4SymmetricWeightsDecompressor": ("scale", "compressed_weight_shape", "result_shape", "result_dtype"),
    "INT8AsymmetricWeightsDecompressor": ("scale", "zero_point", "result_dtype"),
    "INT8SymmetricWeightsDecompressor": ("scale", "result_dtype"),
}


def hook_storage(model):
    from nncf.torch.function_hook.wrapper import get_hook_storage

    return get_hook_storage(model)


def hook_module_name(hook_name: str) -> str:
    """`post_hooks.model:layers:0:mlp:gate_proj:weight__0.0` -> `model.layers.0.mlp.gate_proj`."""
    return re.sub(r"^post_hooks\.", "", hook_name).split(":weight", 1)[0].replace(":", ".")


def lora_quantizers(model) -> dict[str, torch.nn.Module]:
    """Module name -> the 4-bit LoRA quantizer on its weight (8-bit backup quantizers have no adapter)."""
    from nncf.torch.quantization.layers import LoraMixin

    return {hook_module_name(name): q for name, q in hook_storage(model).named_hooks()
            if isinstance(q, LoraMixin) and q.num_bits == 4}


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def decompressor_spec(hook_name: str, module) -> dict:
    """A weight decompressor hook as JSON: its class and what its constructor needs (shapes, dtypes)."""
    cls = type(module)
    if cls.__name__ not in DECOMPRESSORS or cls.__module__ != DECOMPRESSOR_MODULE:
        raise TypeError(f"nncf hook {hook_name} is a {cls.__module__}.{cls.__name__}, not one of the weight "
                        f"decompressors flexrank saves ({', '.join(DECOMPRESSORS)}): was the model stripped?")
    args = DECOMPRESSORS[cls.__name__]
    spec = {"hook": hook_name, "class": cls.__name__, "scale_shape": list(module._scale.shape),
            "result_dtype": dtype_name(module.result_dtype)}
    if "zero_point" in args:  # INT4 keeps the unpacked shape; INT8 stores it as is
        spec["zero_point_shape"] = list(getattr(module, "zero_point_shape", module._zero_point.shape))
    for arg in ("compressed_weight_shape", "result_shape"):
        if arg in args:
            value = getattr(module, arg)
            spec[arg] = None if value is None else list(value)
    return spec


def build_decompressor(spec: dict, dtype_of) -> torch.nn.Module:
    """An empty decompressor of `spec`'s class and shapes (its tensors are loaded afterwards); `dtype_of(name)`
    turns a stored dtype name into a torch dtype. A ValueError names an unknown class."""
    from nncf.torch.quantization import layers

    if spec.get("class") not in DECOMPRESSORS:
        raise ValueError(f"unknown decompressor {spec.get('class')!r}")
    args = DECOMPRESSORS[spec["class"]]
    kwargs = {"scale": torch.zeros(spec["scale_shape"]), "result_dtype": dtype_of(spec["result_dtype"])}
    if "zero_point" in args:
        kwargs["zero_point"] = torch.zeros(spec["zero_point_shape"], dtype=torch.uint8)
    for arg in ("compressed_weight_shape", "result_shape"):
        if arg in args:
            kwargs[arg] = None if spec[arg] is None else torch.Size(spec[arg])
    return getattr(layers, spec["class"])(**kwargs)


def with_decompressors(model, hooks: dict[str, torch.nn.Module]):
    """`model` wrapped by nncf with each decompressor inserted under its hook name."""
    from nncf.torch.function_hook.wrapper import wrap_model

    model = wrap_model(model)
    storage = hook_storage(model)
    for name, hook in hooks.items():
        storage.insert_hook_by_name(name, hook)
    return model


def allow_config_globals() -> None:
    """nncf's config holds this enum: allowed, so its state loads with weights_only=True."""
    from nncf.common.quantization.structs import QuantizationScheme

    torch.serialization.add_safe_globals([QuantizationScheme])


def _tiny_model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def private_api_problems() -> list[str]:
    """Compress a tiny Llama with FQ_LORA, then strip it: the LoRA quantizers are found by module, and every
    decompressor rebuilt from its JSON spec decompresses its weight exactly as nncf's own."""
    import nncf
    from nncf.parameters import CompressionFormat, CompressWeightsMode
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters

    problems = []

    def expect(holds: bool, what: str) -> None:
        if not holds:
            problems.append(f"nncf {version('nncf')}: {what} no longer holds (used by adapters/nncf_internals.py)")

    try:
        ids = torch.randint(0, 64, (1, 8))
        model = nncf.compress_weights(_tiny_model(), mode=CompressWeightsMode.INT4_ASYM, group_size=16,
                                      dataset=nncf.Dataset([{"input_ids": ids}]), backup_mode=nncf.BackupMode.NONE,
                                      compression_format=CompressionFormat.FQ_LORA,
                                      advanced_parameters=AdvancedCompressionParameters(lora_adapter_rank=4))
        linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        found = set(lora_quantizers(model))
        expect(bool(found) and found <= linear, "hook_storage(model).named_hooks() names each 4-bit LoRA "
               f"quantizer post_hooks.<module:path>:weight__N (LoraMixin, num_bits 4) (found {sorted(found)[:3]})")
        stripped = nncf.strip(model, do_copy=True, strip_format=nncf.StripFormat.DQ, example_input={"input_ids": ids})
        hooks = dict(hook_storage(stripped).named_hooks())
        expect(bool(hooks), "nncf.strip(..., StripFormat.DQ) leaves weight decompressor hooks")
        for name, hook in hooks.items():
            rebuilt = build_decompressor(decompressor_spec(name, hook), lambda n: getattr(torch, n))
            rebuilt.load_state_dict(hook.state_dict())
            weight = stripped.get_submodule(hook_module_name(name)).weight
            expect(torch.equal(rebuilt(weight), hook(weight)), f"a {type(hook).__name__} rebuilt from its "
                   "constructor arguments and state dict decompresses as the original")
    except Exception as exc:  # a renamed module or class: the check itself cannot run
        problems.append(f"nncf {version('nncf')}: compressing and stripping a tiny model failed: "
                        f"{type(exc).__name__}: {exc}")
    return problems
