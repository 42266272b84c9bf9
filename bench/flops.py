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
MFU_FORMULA = "MFU = useful tokens/s x FLOPs/token / peak FLOP/s of the GPU for the dtype the matmuls ran in"

# Dense peak TFLOP/s per GPU (no sparsity), from the vendors' data sheets, by the dtype the matmuls run in:
# bf16 (tensor cores), tf32 (fp32 tensors on tensor cores: only when torch's float32 matmul precision is "high" or
# "medium") and fp32 (plain CUDA cores: torch's default precision "highest"). Matched against the device name in
# this order (the first key contained in it); --peak-tflops overrides.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "tf32": 494.7, "fp32": 66.9},       # H200 SXM
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100": {"bf16": 989.0, "tf32": 494.7, "fp32": 66.9},       # H100 SXM
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "RTX 4090": {"bf16": 165.2, "tf32": 82.6, "fp32": 82.6},
}


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
    """seq_len: the mean span a token attends over, its own example's length averaged over the tokens:
    sum(len^2) / sum(len) over the examples (measure.py's attention_span). Useful work only: neither the padding
    of a padded batch nor a packed row's cross-example attention that a dense mask computes and throws away."""
    return 4 * s.n_base + 6 * s.n_adapter + 12 * s.layers * s.d_attn * seq_len


def mfu(tokens_per_s: float, flops_token: float, peak_tflops: float) -> float:
    return tokens_per_s * flops_token / (peak_tflops * 1e12)


def peak_tflops_of(device_name: str, compute: str = "bf16") -> float | None:
    """The dense peak of `device_name` for matmuls in `compute` (bf16 | tf32 | fp32); None for an unknown GPU."""
    table = next((v for k, v in PEAK_TFLOPS.items() if k.lower() in device_name.lower()), None)
    return None if table is None else table[compute]


def fp32_compute(float32_matmul_precision: str) -> str:
    """What an fp32 matmul runs as under torch.set_float32_matmul_precision(...)."""
    return "fp32" if float32_matmul_precision == "highest" else "tf32"
