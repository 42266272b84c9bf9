"""GPU benchmark (needs CUDA): tokens/s, peak memory and MFU of flexrank LoRA training for SDPA vs flash-attn 2 vs
liger kernels, LoRA vs QLoRA, packing on/off, on the bundled SmolLM2-135M and on a ~1B model (--model, a local
folder or hub id). One command, one table:

    python bench/gpu.py [--model smollm2-135m-instruct --model /path/to/Llama-3.2-1B]
    python bench/gpu.py --dry-run        # CPU: shapes and the FLOP count per token, no training

Every row is one measurement by bench/measure.py (its own process, the mixed-length set of corpus.py).
"""

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import flops  # noqa: E402
from run import Variant, measure  # noqa: E402

# (label, method, packing, model section extras)
ROWS = [
    ("LoRA, SDPA, padded", "lora", False, {"attn_implementation": "sdpa"}),
    ("LoRA, SDPA, packed", "lora", True, {"attn_implementation": "sdpa"}),
    # flexrank's varlen attention for packed rows (flash-attn / torch varlen in bf16, SDPA per document in fp32):
    # no dense mask, no cuDNN plan per step; bf16 should be at least as fast as fp32 here
    ("LoRA, varlen, packed, fp32", "lora", True, {"attn_implementation": "varlen"}),
    ("LoRA, varlen, packed, bf16", "lora", True, {"attn_implementation": "varlen", "dtype": "bfloat16"}),
    ("LoRA, flash-attn 2, packed", "lora", True, {"attn_implementation": "flash_attention_2"}),
    ("LoRA, flash-attn 2 + liger, packed", "lora", True, {"attn_implementation": "flash_attention_2", "liger_kernel": True}),
    ("QLoRA, flash-attn 2, packed", "qlora", True, {"attn_implementation": "flash_attention_2"}),
]


def model_config(name: str):
    from transformers import AutoConfig

    from flexrank.config import load_config
    from flexrank.models.loading import _model_path

    return AutoConfig.from_pretrained(_model_path(load_config(raw={"model": {"name_or_path": name}}).model))


def dry_run(a) -> str:
    lines = [flops.FORMULA, "(4*N_base: frozen base, forward + backward through activations, no weight gradients; "
             "6*N_adapter: adapters, with weight gradients; 12*L*d_attn*S: attention QK^T and AV, forward + backward)"]
    for name in a.model:
        s = flops.shapes(model_config(name), a.r)
        lines.append(f"\n{name}: L={s.layers} d_attn={s.d_attn} N_base={s.n_base:,} N_adapter={s.n_adapter:,} "
                     f"(r={a.r}, all-linear) S={a.seq_len}")
        seen = {}
        for n, i, o in s.linears:  # one line per distinct Linear shape, with how many there are
            key = (n.rsplit(".", 1)[-1], i, o)
            seen[key] = seen.get(key, 0) + 1
        lines += [f"  {leaf:12s} {i:6d} x {o:6d}  x{count}" for (leaf, i, o), count in seen.items()]
        lines.append(f"  FLOPs/token = {flops.flops_per_token(s, a.seq_len):,.0f}")
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", help="repeatable; default: the bundled SmolLM2-135M")
    p.add_argument("--dry-run", action="store_true", help="print shapes and FLOPs per token; no GPU needed")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512, help="S of the attention term (the data's max_length)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: by name)")
    a = p.parse_args(argv)
    a.model = a.model or ["smollm2-135m-instruct"]
    if a.dry_run:
        text = dry_run(a)
        print(text)
        return text
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs CUDA (use --dry-run on CPU)")
    device = torch.cuda.get_device_name()
    peak = a.peak_tflops or flops.peak_tflops_of(device)
    lines = [f"{device}, peak {peak} TFLOP/s; MFU = useful tokens/s x FLOPs/token / peak; {flops.FORMULA}", "",
             "| model | run | tokens/s | peak GiB | MFU |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.model:
            s = flops.shapes(model_config(name), a.r)
            settings = argparse.Namespace(model=name, batch=a.batch, steps=a.steps, warmup=a.warmup,
                                          max_length=a.seq_len, long_max_length=a.seq_len)
            for label, method, packing, model_extra in ROWS:
                try:
                    m = measure(Variant("flexrank", method, data="mixed", packing=packing), settings, Path(tmp),
                                {"model_extra": model_extra})
                except RuntimeError as exc:  # e.g. flash-attn or liger not installed: say so, go on
                    lines.append(f"| {name} | {label} | failed: {str(exc).splitlines()[-1][:80]} | | |")
                    continue
                # S: the mean example length when packed (attention stays inside an example), the row when padded
                seq = m["useful_tokens_per_s"] * m["step_s"] / a.batch if packing else a.seq_len
                util = flops.mfu(m["useful_tokens_per_s"], flops.flops_per_token(s, seq), peak) if peak else None
                lines.append(f"| {name} | {label} | {m['useful_tokens_per_s']:.0f} | "
                             f"{m['peak_memory_bytes'] / 2**30:.2f} | {'' if util is None else f'{100 * util:.1f}%'} |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
