"""Training FLOPs per token for an adapter run and the model FLOPs utilisation (MFU) they give.

For LoRA-type training the frozen base costs ~4·N_base per token: 2·N_base forward plus 2·N_base for the backward
through the activations (no weight gradients for frozen weights); the adapters cost the full 6·N_adapter (forward,
activation gradients, weight gradients); attention scores and values add 12·L·d_attn·S per token (4·L·d_attn·S
forward for QKᵀ and AV, twice that backward; counted as if non-causal, as PaLM's MFU does). N_base counts the
weights of every nn.Linear (lm_head included, embeddings excluded: a lookup, not a matmul).
"""

from dataclasses import dataclass

import torch

FORMULA = "FLOPs/token = 4*N_base + 6*N_adapter + 12*L*d_attn*S"

# Dense peak TFLOP/s per GPU (bf16/fp16, no sparsity) from the vendors' data sheets; --peak-tflops overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0,
               "RTX 4090": 165.0, "V100": 125.0}


@dataclass
class Shapes:
    n_base: int  # weights of the Linear layers (matmuls per token)
    n_adapter: int  # LoRA A and B weights
    layers: int
    d_attn: int  # heads x head_dim (query width)
    linears: list[tuple[str, int, int]]  # (name, in, out) of every Linear, for --dry-run


def shapes(config, r: int, targets: str | list[str] = "all-linear") -> Shapes:
    """From a transformers config, on the meta device (no weights are read or allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linears = [(n, m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    out_names = {"lm_head", "score", "classifier"}

    def targeted(name: str) -> bool:  # peft's all-linear leaves the output layer out
        leaf = name.rsplit(".", 1)[-1]
        return leaf not in out_names if targets == "all-linear" else leaf in targets

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return Shapes(n_base=sum(i * o for _, i, o in linears),
                  n_adapter=sum(r * (i + o) for n, i, o in linears if targeted(n)),
                  layers=config.num_hidden_layers, d_attn=config.num_attention_heads * head_dim, linears=linears)


def flops_per_token(s: Shapes, seq_len: float) -> float:
    """seq_len: the length each token attends over (one example's length when packed, the row's when padded)."""
    return 4 * s.n_base + 6 * s.n_adapter + 12 * s.layers * s.d_attn * seq_len


def mfu(tokens_per_s: float, flops_token: float, peak_tflops: float) -> float:
    return tokens_per_s * flops_token / (peak_tflops * 1e12)


def peak_tflops_of(device_name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k.lower() in device_name.lower()), None)
