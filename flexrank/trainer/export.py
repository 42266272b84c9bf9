"""Turn a rank-controlled adapter into a plain peft LoRA adapter that stock peft loads, with identical logits.

For each RankLoraLinear: keep the ranks whose g ⊙ m is non-zero, fold g ⊙ m into B's columns, and keep the
scale s = alpha/r of training by writing r' in `rank_pattern` and alpha' = s·r' in `alpha_pattern`.
A module with no active rank is left out of `target_modules`: its ΔW is zero.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

from .rank_layer import rank_layers

_PEFT_PREFIX = "base_model.model."


def plain_lora_state(peft_model, adapter: str = "default"):
    """(state_dict, rank_pattern, alpha_pattern) of the active subnet, in peft's saved-adapter key format."""
    state = {k: v for k, v in get_peft_model_state_dict(peft_model, adapter_name=adapter).items()
             if ".lora_gate" not in k}
    ranks, alphas = {}, {}
    for name, layer in rank_layers(peft_model).items():
        for part in ("lora_A", "lora_B"):
            state.pop(f"{name}.{part}.weight", None)
        weights = layer.rank_weights(adapter).detach().float()
        keep = torch.nonzero(weights).flatten()
        if keep.numel() == 0:
            continue
        a = layer.lora_A[adapter].weight.detach()
        b = layer.lora_B[adapter].weight.detach()
        state[f"{name}.lora_A.weight"] = a[keep].contiguous()
        state[f"{name}.lora_B.weight"] = (b[:, keep].float() * weights[keep]).to(b.dtype).contiguous()
        key = name.removeprefix(_PEFT_PREFIX)
        ranks[key] = int(keep.numel())
        alphas[key] = float(layer.scaling[adapter]) * keep.numel()
    return state, ranks, alphas


def export_plain_adapter(peft_model, out_dir: str | Path, adapter: str = "default") -> dict:
    """Write adapter_config.json + adapter_model.safetensors (atomically). Returns a summary."""
    state, ranks, alphas = plain_lora_state(peft_model, adapter)
    src = peft_model.peft_config[adapter]
    config = LoraConfig(
        r=max(ranks.values(), default=1), lora_alpha=max(alphas.values(), default=1.0),
        target_modules=sorted(ranks), rank_pattern=ranks, alpha_pattern=alphas,
        lora_dropout=src.lora_dropout, bias=src.bias, fan_in_fan_out=src.fan_in_fan_out,
        modules_to_save=src.modules_to_save, task_type=src.task_type,
        base_model_name_or_path=src.base_model_name_or_path, layer_replication=src.layer_replication,
    )
    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp / "adapter_model.safetensors",
              metadata={"format": "pt"})
    summary = {"modules": len(ranks), "total_rank": sum(ranks.values()),
               "params": int(sum(v.numel() for k, v in state.items() if ".lora_" in k)), "rank_pattern": ranks}
    (tmp / "flexrank_export.json").write_text(json.dumps(summary, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return summary
