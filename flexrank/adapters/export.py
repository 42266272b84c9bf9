"""Write any trained adapter as a plain peft adapter that stock peft loads, with identical logits.

For each RankLoraLinear: keep the ranks whose g ⊙ m is non-zero, fold g ⊙ m into B's columns, and keep the
scale s of training by writing r' in `rank_pattern` and alpha' = s·r' in `alpha_pattern`. A module with no
active rank is left out of `target_modules`: its ΔW is zero. Adapters without rank layers are written as they
are. Under ZeRO-3 / FSDP2 pass the gathered full state dict (backends.full_state_dict).

A run whose every rank is pruned has no adapter to write (peft refuses a LoRA config without target modules,
and a placeholder rank with B = 0 would pass for a trained adapter downstream): export raises
`NothingToExport`, a ConfigError that says so, and writes nothing; the base model alone is that run's model.
"""

import copy
import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

from ..io import output_folder
from ..errors import ConfigError
from .rank_layer import rank_layers

_PEFT_PREFIX = "base_model.model."
EXPORT_MARKER = "flexrank_export.json"  # every export's summary (what it holds)


def save_export(out: str | Path, write, summary: dict, key: str = "--out") -> None:
    """`write(folder)` fills a fresh folder, marked as flexrank's and holding the export's summary, that then
    replaces `out` whole (refused, before anything is written, when `out` holds files flexrank did not write)."""
    with output_folder(out, key) as tmp:
        write(tmp)
        (tmp / EXPORT_MARKER).write_text(json.dumps(summary, indent=1))


def plain_lora_state(peft_model, adapter: str = "default", full_state: dict | None = None):
    """(adapter state dict in peft's saved format, rank_pattern, alpha_pattern) of the active subnet."""
    full_state = peft_model.state_dict() if full_state is None else full_state
    state = {k: v for k, v in get_peft_model_state_dict(peft_model, state_dict=full_state,
                                                        adapter_name=adapter).items() if ".lora_gate" not in k}
    ranks, alphas = {}, {}
    for name, layer in rank_layers(peft_model).items():
        for part in ("lora_A", "lora_B"):
            state.pop(f"{name}.{part}.weight", None)
        gate = full_state[f"{name}.lora_gate.{adapter}"].detach().float().cpu()
        weights = gate * layer.lora_rank_mask[adapter].float().cpu()  # masks are replicated buffers
        keep = torch.nonzero(weights).flatten()
        if keep.numel() == 0:
            continue
        a = full_state[f"{name}.lora_A.{adapter}.weight"].detach().cpu()
        b = full_state[f"{name}.lora_B.{adapter}.weight"].detach().cpu()
        state[f"{name}.lora_A.weight"] = a[keep]
        state[f"{name}.lora_B.weight"] = (b[:, keep].float() * weights[keep]).to(b.dtype)
        key = name.removeprefix(_PEFT_PREFIX)
        ranks[key] = int(keep.numel())
        alphas[key] = float(layer.scaling[adapter]) * keep.numel()
    return state, ranks, alphas


class NothingToExport(ConfigError):
    def __init__(self, total: int):
        super().__init__("export", f"0 of {total} ranks active", "an adapter with at least one active rank",
                         "every rank was pruned, so the base model alone is this run's model and there is no "
                         "adapter to write; train with a lower adapter.sora.threshold / sparse_lambda, a larger "
                         "adapter.adalora.target_r, or export a larger subnet")


def _plain_config(src: LoraConfig, ranks: dict, alphas: dict) -> LoraConfig:
    return LoraConfig(
        r=max(ranks.values(), default=1), lora_alpha=max(alphas.values(), default=1.0),
        target_modules=sorted(ranks), rank_pattern=ranks, alpha_pattern=alphas,
        lora_dropout=src.lora_dropout, bias=src.bias, fan_in_fan_out=src.fan_in_fan_out,
        modules_to_save=src.modules_to_save, task_type=src.task_type,
        base_model_name_or_path=src.base_model_name_or_path, layer_replication=src.layer_replication,
    )


def export_plain_adapter(peft_model, out_dir: str | Path, adapter: str = "default",
                         full_state: dict | None = None, transform=None) -> dict:
    """Write adapter_config.json + adapter_model.safetensors (atomically: a folder appears whole or not at all).
    `transform(state)` maps the plain state before it is written (an importance-ordered base: back to the stock
    base's channel order)."""
    state, ranks, alphas = plain_lora_state(peft_model, adapter, full_state)
    if transform is not None:
        state = transform(state)
    layers = rank_layers(peft_model)
    if layers and not ranks:
        raise NothingToExport(sum(layer.r[adapter] for layer in layers.values()))
    src = peft_model.peft_config[adapter]
    config = _plain_config(src, ranks, alphas) if layers else copy.deepcopy(src)
    summary = {"modules": len(ranks), "total_rank": sum(ranks.values()),
               "params": int(sum(v.numel() for v in state.values())), "rank_pattern": ranks}

    def write(folder: Path) -> None:
        config.save_pretrained(folder)
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, folder / "adapter_model.safetensors",
                  metadata={"format": "pt"})

    save_export(out_dir, write, summary)
    return summary
