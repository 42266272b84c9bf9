"""Variable-length attention for packed rows: each document of a packed row attends to itself only, at the cost of
its own length squared, with no dense mask and no new kernel plan per step.

Registered with transformers under `ATTENTION_NAME` (AttentionInterface for the attention, AttentionMaskInterface
for its mask), so a model loaded with `attn_implementation=ATTENTION_NAME` calls `varlen_attention_forward` in every
layer. The document boundaries come from the batch: PackingCollator (data/records.py) emits `cu_seq_lens_q/k`
(int32) and `max_length_q/k` (python ints), which transformers passes down to the attention function, so the model
needs no host sync to find them. The backend is chosen per call from the inputs' device and dtype, in this order
(`backend_for`, kernels.py holds the rules):

- flash-attn's `flash_attn_varlen_func` (CUDA, half precision, flash-attn importable);
- torch's own `torch.nn.attention.varlen.varlen_attn` (CUDA, half precision, torch's flash kernels, sm80+);
- otherwise SDPA per document, `is_causal=True` and no mask: documents are grouped by their length rounded up to a
  bucket multiple and each group runs as one batch (right-padding a document is exact under a causal mask: no real
  query sees a padded key). On CUDA the cuDNN SDPA kernel is left out there: it builds a plan for every new shape
  (117-157 ms per forward + backward on an H200), and the groups' shapes change every step.

Batches that carry a padding mask (evaluation, generation with a KV cache) run transformers' own SDPA path with
transformers' own mask: the mask function returns None only where this module handles causality itself (no padding
mask, as many keys as queries)."""

from __future__ import annotations

import functools
import inspect
import weakref
from dataclasses import dataclass, field

import torch

from .kernels import VARLEN as ATTENTION_NAME
from .kernels import VARLEN_LABELS, varlen_backend

BUCKET_MULTIPLE = {"cuda": 64}  # other devices: 16 (CPU attention is FLOP-bound, so less padding)

_registered = False
_announced: str | None = None  # the backend the load-time log line named (a different one is logged when used)


def register() -> None:
    """Make `ATTENTION_NAME` a valid `attn_implementation` (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, varlen_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, varlen_mask)
    _registered = True


def announce(backend: str) -> None:
    global _announced
    _announced = backend


def varlen_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, use_vmap=False,
                **kwargs):
    """None (no mask tensor at all) where varlen_attention_forward keeps causality per document itself: no padding
    mask, as many keys as queries and no extra mask function. Otherwise transformers' SDPA mask, for the SDPA path."""
    from transformers import masking_utils

    if attention_mask is None and not use_vmap and q_length == kv_length and _is_zero(q_offset) and \
            _is_zero(kv_offset):
        return None
    return masking_utils.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                                   kv_offset=kv_offset, attention_mask=attention_mask, use_vmap=use_vmap, **kwargs)


def _is_zero(offset) -> bool:
    return isinstance(offset, int) and offset == 0


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             sliding_window=None, softcap=None, is_causal=None, cu_seq_lens_q=None,
                             cu_seq_lens_k=None, max_length_q=None, max_length_k=None, position_ids=None, **kwargs):
    """transformers' attention-function interface: query (B, H, T, D), key/value (B, H_kv, T, D); returns
    ((B, T, H, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is not None or query.shape[2] != key.shape[2] or not is_causal:
        # A padding mask, a KV cache or bidirectional attention: transformers' SDPA path (with its own mask).
        if cu_seq_lens_q is not None:
            raise ValueError(f"{ATTENTION_NAME}: a packed row (cu_seq_lens_q) needs causal self-attention without a "
                             "padding mask or KV cache")
        if softcap is not None:
            raise ValueError(f"{ATTENTION_NAME}: attention logit softcapping needs flash-attn (or eager attention)")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if kwargs.get("s_aux") is not None:
        raise ValueError(f"{ATTENTION_NAME}: attention sinks (s_aux) are not supported; use flash_attention_2 or eager")
    # Self-attention over a packed row: cu_seq_lens_k is cu_seq_lens_q (compared by shape only: comparing the
    # values would cost a host sync in every layer).
    if cu_seq_lens_q is not None and cu_seq_lens_k is not None and cu_seq_lens_k.shape != cu_seq_lens_q.shape:
        raise ValueError(f"{ATTENTION_NAME}: packed rows need the same documents for queries and keys")
    dtype = _compute_dtype(query)
    backend = backend_for(query.device, dtype, sliding_window=sliding_window, softcap=softcap, dropout=dropout)
    docs = _documents(query, cu_seq_lens_q, max_length_q, position_ids)
    if sliding_window is not None and backend == "sdpa" and docs.max_length > sliding_window:
        raise ValueError(f"{ATTENTION_NAME}: a document of {docs.max_length} tokens with a sliding window of "
                         f"{sliding_window} needs flash-attn or torch varlen (CUDA, half precision); use "
                         "model.attn_implementation sdpa here")
    if backend == "sdpa":
        return _sdpa_documents(module, query, key, value, docs, dropout, scaling), None
    batch, heads, _, dim = query.shape
    # (B, H, T, D) -> (B*T, H, D): a view of the projections' layout (contiguous() is then free)
    q, k, v = (x.transpose(1, 2).reshape(-1, x.shape[1], dim).to(dtype).contiguous() for x in (query, key, value))
    cu, max_len = docs.cu_seqlens(query.device), docs.max_length
    window = (sliding_window - 1, 0) if sliding_window is not None else (-1, 0)
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        extra = {"softcap": softcap} if softcap is not None else {}  # flash-attn >= 2.6
        out = flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout, softmax_scale=scaling,
                                     causal=True, window_size=window, **extra)
    else:
        out = _torch_varlen(q, k, v, cu, max_len, scaling, window)
    return out.view(batch, -1, heads, out.shape[-1]), None


def _compute_dtype(query) -> torch.dtype:
    """The dtype attention runs in: autocast's where it is on (RoPE can leave fp32 queries under autocast)."""
    device = query.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return query.dtype


_backends: dict[tuple, tuple[str, str]] = {}


def backend_for(device, dtype, sliding_window=None, softcap=None, dropout: float = 0.0) -> str:
    """The backend for inputs on `device` in `dtype` (cached; the first use of one that differs from the load-time
    log line is logged)."""
    key = (device.type, device.index, dtype, sliding_window is not None, softcap is not None, dropout > 0)
    if key not in _backends:
        choice = varlen_backend(device.type, dtype, softcap=softcap is not None, dropout=dropout > 0)
        _backends[key] = choice
        if _announced is not None and choice[0] != _announced:
            print(f"[flexrank] attention: packed rows via {VARLEN_LABELS[choice[0]]} ({choice[1]})")
    backend = _backends[key][0]
    if softcap is not None and backend != "flash_attn":
        raise ValueError(f"{ATTENTION_NAME}: attention logit softcapping needs flash-attn ({_backends[key][1]})")
    return backend


@functools.cache
def _varlen_attn_has_window() -> bool:
    from torch.nn.attention.varlen import varlen_attn

    return "window_size" in inspect.signature(varlen_attn).parameters


def _torch_varlen(q, k, v, cu, max_len: int, scaling, window):
    from torch.nn.attention.varlen import varlen_attn

    if _varlen_attn_has_window():  # newer torch (2.13 here): causal is window (-1, 0); scale and GQA are keywords
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling, window_size=window,
                           enable_gqa=q.shape[1] != k.shape[1])
    # the API's first releases: is_causal, the default scale only, no window, no GQA flag
    if window[0] != -1:
        raise ValueError(f"{ATTENTION_NAME}: this torch's varlen_attn has no sliding window; install flash-attn")
    if scaling is not None and abs(scaling - q.shape[-1] ** -0.5) > 1e-12:
        raise ValueError(f"{ATTENTION_NAME}: this torch's varlen_attn has no scale argument; install flash-attn")
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, is_causal=True)


@dataclass
class _Documents:
    """Where the documents of a batch lie in its flattened tokens (B*T). Host-side lengths are computed when a
    backend needs them (SDPA per document), once per batch: every layer gets the same boundary tensors."""
    total: int
    max_length: int
    cu: torch.Tensor | None = None  # (n + 1,) int32, as the collator gave it (on the model's device)
    host_lengths: list[int] | None = None
    groups: dict = field(default_factory=dict)  # (device, multiple) -> bucketed gather indices

    def lengths(self) -> list[int]:
        if self.host_lengths is None:
            self.host_lengths = self.cu.diff().tolist()  # one host sync per batch (cached)
        return self.host_lengths

    def cu_seqlens(self, device) -> torch.Tensor:
        if self.cu is None:
            cu = torch.tensor([0, *self.host_lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
            self.cu = cu.to(device)
        return self.cu


_cache: dict[int, tuple[weakref.ref, _Documents]] = {}


def _documents(query, cu_seq_lens_q, max_length_q, position_ids) -> _Documents:
    """The batch's documents: the collator's cu_seq_lens (no sync), else where position_ids restart (a row packed
    without them: one host sync per batch), else one document per row."""
    batch, _, length, _ = query.shape
    source = cu_seq_lens_q if cu_seq_lens_q is not None else position_ids
    if source is None or (cu_seq_lens_q is None and batch != 1):
        return _Documents(total=batch * length, max_length=length, host_lengths=[length] * batch)
    hit = _cache.get(id(source))
    if hit is not None and hit[0]() is source:
        return hit[1]
    if cu_seq_lens_q is not None:
        if int(cu_seq_lens_q.shape[0]) < 2:
            raise ValueError(f"{ATTENTION_NAME}: cu_seq_lens_q needs at least one document")
        cu = cu_seq_lens_q.to(device=query.device, dtype=torch.int32)
        docs = _Documents(total=batch * length, max_length=int(max_length_q) if max_length_q is not None else 0,
                          cu=cu)
        if max_length_q is None:
            docs.max_length = max(docs.lengths())
    else:
        positions = position_ids.reshape(-1).cpu()
        starts = torch.cat([torch.ones(1, dtype=torch.bool), positions[1:] != positions[:-1] + 1]).nonzero()
        bounds = starts.flatten().tolist() + [int(positions.numel())]
        lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        docs = _Documents(total=batch * length, max_length=max(lengths), host_lengths=lengths)
    if len(_cache) >= 8:
        _cache.clear()
    _cache[id(source)] = (weakref.ref(source), docs)
    return docs


def _groups(docs: _Documents, device, multiple: int):
    """[(n_docs, width, gather, keep)] per bucket width, and the permutation back to token order. `gather` picks each
    document's tokens padded to `width` (pads repeat the document's first token: under the causal mask only padded
    queries see them, and their outputs are dropped), `keep` the real rows of the bucket's flattened output."""
    key = (str(device), multiple)
    if key in docs.groups:
        return docs.groups[key]
    lengths = torch.tensor(docs.lengths(), dtype=torch.long)
    starts = torch.cumsum(lengths, 0) - lengths
    widths = (lengths + multiple - 1) // multiple * multiple
    parts, order = [], []
    for width in widths.unique().tolist():
        chosen = (widths == width).nonzero().flatten()
        offsets = torch.arange(width)
        real = offsets[None, :] < lengths[chosen, None]
        gather = torch.where(real, starts[chosen, None] + offsets[None, :], starts[chosen, None])
        keep = real.flatten().nonzero().flatten()
        order.append(gather.flatten()[keep])
        parts.append((len(chosen), width, gather.flatten().to(device), keep.to(device)))
    order = torch.cat(order)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    docs.groups[key] = parts, inverse.to(device)
    return docs.groups[key]


def _sdpa_documents(module, query, key, value, docs: _Documents, dropout, scaling):
    """Causal SDPA per document, documents of one bucket width batched together; no mask tensor."""
    from transformers.integrations.sdpa_attention import repeat_kv, use_gqa_in_sdpa

    batch, heads, length, dim = query.shape
    extra = {}
    groups = getattr(module, "num_key_value_groups", 1)
    half = _compute_dtype(query) in (torch.float16, torch.bfloat16)
    if groups > 1:
        # enable_gqa where SDPA keeps a fused kernel with it (CPU; CUDA's flash kernel, half precision only)
        if use_gqa_in_sdpa(None, key, value) and (query.device.type != "cuda" or half):
            extra["enable_gqa"] = True
        else:
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    lengths = docs.lengths()
    with _no_cudnn(query.device):
        if len(lengths) == batch and all(n == length for n in lengths):  # one document per row: no gather
            out = _sdpa(query, key, value, dropout, scaling, extra)
            return out.transpose(1, 2)
        parts, inverse = _groups(docs, query.device, BUCKET_MULTIPLE.get(query.device.type, 16))
        q, k, v = (x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[-1]) for x in (query, key, value))
        outputs = []
        for n, width, gather, keep in parts:
            qb, kb, vb = (x.index_select(0, gather).view(n, width, x.shape[1], x.shape[2]).transpose(1, 2)
                          for x in (q, k, v))
            out = _sdpa(qb, kb, vb, dropout, scaling, extra)  # (n, H, width, D)
            outputs.append(out.transpose(1, 2).reshape(n * width, heads, -1).index_select(0, keep))
    out = torch.cat(outputs).index_select(0, inverse)
    return out.view(batch, length, heads, -1)


def _sdpa(q, k, v, dropout, scaling, extra):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=dropout,
                                                            is_causal=True, scale=scaling, **extra)


def _no_cudnn(device):
    """SDPA without its cuDNN kernel on CUDA (a plan per new shape); flash, memory-efficient or math remain."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
