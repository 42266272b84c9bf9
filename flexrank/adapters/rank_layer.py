"""One LoRA layer whose active rank is set at run time: ΔW = B · diag(g ⊙ m) · A · s.

`g` (`lora_gate`) is a per-rank vector (ones unless a controller learns it), `m` (`lora_rank_mask`) a per-rank
0/1 buffer that controllers write before a step. It plugs into peft through the custom-module mapping and a
LoRA variant, so peft's target matching, QLoRA bases (a bnb Linear4bit is an nn.Linear), save/load and merge keep
working. Masked ranks still take part in the graph, so their gradients are zeros, not None (DDP needs that).

This is the one module that relies on peft internals (no public API registers a custom LoRA layer):
LoraConfig._register_custom_module, the LoraVariant hooks, peft's BufferDict; `private_api_problems()` checks them
against the installed peft and tests/test_internals.py fails, naming the version, when one changes.
"""

import inspect
from importlib.metadata import version

import torch
from peft import LoraConfig
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraVariant
from torch import nn

from ..distributed.backends import foreach_copy_


class _OrthogonalityGradient(torch.autograd.Function):
    """Identity on the layer's output; its backward adds w · ∂(‖AAᵀ − I‖_F + ‖BᵀB − I‖_F)/∂(A, B) to the
    gradients of A and B (AdaLoRA's orthogonal regulariser) and leaves the regulariser's value on `holder` (a
    tensor, read only when logged: no device sync per layer). Applying it inside the layer's own backward, where
    ZeRO-3 and FSDP2 have A and B gathered, avoids a loss term over parameters that are sharded outside forward."""

    @staticmethod
    def forward(ctx, result, a, b, weight, holder):
        ctx.save_for_backward(a, b)
        ctx.weight, ctx.holder = weight, holder
        return result.view_as(result)

    @staticmethod
    def backward(ctx, grad):
        a_in, b_in = ctx.saved_tensors
        a, b = a_in.float(), b_in.float()
        minus_eye = _minus_eye(a.shape[0], a.device)
        m_a = torch.addmm(minus_eye, a, a.T)  # A Aᵀ − I
        m_b = torch.addmm(minus_eye, b.T, b)  # Bᵀ B − I
        norm_a, norm_b = m_a.norm(), m_b.norm()
        ctx.holder.orthogonality_value = (norm_a + norm_b).detach()
        # d‖M‖_F = ⟨M, dM⟩ / ‖M‖_F with M symmetric: ∂/∂A = 2 M A / ‖M‖_F, ∂/∂B = 2 B M / ‖M‖_F
        grad_a = (m_a @ a).mul_(2 * ctx.weight / norm_a.clamp_min(1e-12))
        grad_b = (b @ m_b).mul_(2 * ctx.weight / norm_b.clamp_min(1e-12))
        return grad, grad_a.to(a_in.dtype), grad_b.to(b_in.dtype), None, None


class BatchedOrthogonalityGradient(torch.autograd.Function):
    """The same regulariser gradient as _OrthogonalityGradient, for many layers at once: `apply(weight, owner,
    counts, *params)` returns a zero to add to the loss, and its backward adds w · ∂(‖AAᵀ − I‖_F + ‖BᵀB − I‖_F)/∂(A, B)
    to every A and B, with batched matrix products per group of same-shaped layers (`counts[i]` A's, then as many
    B's, per group): a dozen operators per group instead of a Python autograd node and about twenty operators per
    layer. Only for A and B that are whole tensors outside the layers' forward (one process, DDP, ZeRO-1/2), all
    on one device; leaves the regulariser's value per layer (group order) on `owner.orthogonality_values`."""

    @staticmethod
    def forward(ctx, weight, owner, counts, *params):
        ctx.save_for_backward(*params)
        ctx.weight, ctx.owner, ctx.counts = weight, owner, counts
        return params[0].new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        params, grads, values, start = ctx.saved_tensors, [], [], 0
        for n in ctx.counts:
            a_in, b_in = params[start:start + n], params[start + n:start + 2 * n]
            start += 2 * n
            a, b = torch.stack(a_in).float(), torch.stack(b_in).float()  # (n, r, in), (n, out, r)
            minus_eye = _minus_eye(a.shape[1], a.device)
            m_a = torch.baddbmm(minus_eye, a, a.transpose(1, 2))  # A Aᵀ − I
            m_b = torch.baddbmm(minus_eye, b.transpose(1, 2), b)  # Bᵀ B − I
            norm_a, norm_b = torch.linalg.vector_norm(m_a, dim=(1, 2)), torch.linalg.vector_norm(m_b, dim=(1, 2))
            values.append(norm_a + norm_b)
            grad_a = torch.bmm(m_a, a).mul_((2 * ctx.weight / norm_a.clamp_min(1e-12)).view(-1, 1, 1))
            grad_b = torch.bmm(b, m_b).mul_((2 * ctx.weight / norm_b.clamp_min(1e-12)).view(-1, 1, 1))
            grads += grad_a.to(a_in[0].dtype).unbind(0) + grad_b.to(b_in[0].dtype).unbind(0)
        ctx.owner.orthogonality_values = torch.cat(values).detach()
        return None, None, None, *grads


_MINUS_EYE: dict[tuple[int, torch.device], torch.Tensor] = {}


def _minus_eye(r: int, device: torch.device) -> torch.Tensor:
    """−I of size r in float32, made once per (r, device): the regulariser's backward runs in every layer."""
    key = (r, device)
    if key not in _MINUS_EYE:
        _MINUS_EYE[key] = -torch.eye(r, device=device, dtype=torch.float32)
    return _MINUS_EYE[key]


class _MaskUnchangedUntilBackward(torch.autograd.Function):
    """Identity whose backward checks that the layer's mask was not rewritten since this forward. With gradient
    checkpointing the backward recomputes the forward from the *current* mask: a controller that changed it in
    between would silently train another subnet than the loss was computed with. Fail loudly instead.
    Without checkpointing the backward uses the mask product saved by the forward, so there is nothing to guard:
    FlexTrainer turns the guard off then (`guard_recomputation`), as it costs a Python autograd node per layer."""

    @staticmethod
    def forward(ctx, h, layer, generation):
        ctx.layer, ctx.generation = layer, generation
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad):
        if ctx.layer.mask_generation != ctx.generation:
            raise RuntimeError("flexrank: a rank mask changed between a forward pass and its backward (gradient "
                               "checkpointing would recompute with the new mask); set masks only before a pass")
        return grad, None, None


class RankVariant(LoraVariant):
    """peft calls these with the layer; all maths lives on `RankLoraLinear` so it is written once."""

    @staticmethod
    def init(module, adapter_name, **kwargs):
        if not hasattr(module, "lora_gate"):  # first adapter: nn.Module.__init__ has run by now
            module.lora_gate = nn.ParameterDict()
            module.lora_rank_mask = BufferDict(persistent=False)
        r = module.r[adapter_name]
        weight = module.lora_A[adapter_name].weight
        module.lora_gate[adapter_name] = nn.Parameter(torch.ones(r, device=weight.device, dtype=weight.dtype),
                                                      requires_grad=False)
        module.lora_rank_mask[adapter_name] = torch.ones(r, device=weight.device, dtype=weight.dtype)

    @staticmethod
    def forward(module, active_adapter, x, result, **kwargs):
        a = active_adapter
        h = module.lora_A[a](module.lora_dropout[a](x))
        h = h * module.rank_weights(a).to(h.dtype)
        if module.guard_recompute and torch.is_grad_enabled():
            h = _MaskUnchangedUntilBackward.apply(h, module, module.mask_generation)
        result = result + module.lora_B[a](h) * module.scaling[a]
        weight = getattr(module, "orthogonality_weight", 0.0)  # set by the AdaLoRA controller
        if weight and torch.is_grad_enabled():
            result = _OrthogonalityGradient.apply(result, module.lora_A[a].weight, module.lora_B[a].weight, weight,
                                                  module)
        return result

    @staticmethod
    def merge_safe(module, active_adapter, orig_weight):
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter, orig_weight):
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter, orig_weight):
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)


class RankLoraLinear(LoraLinear):
    # The gate is not in adapter_layer_names, so peft's set_adapter does not make it trainable: it stays frozen
    # (ones) unless a controller that learns it switches requires_grad on.
    other_param_names = LoraLinear.other_param_names + ("lora_gate", "lora_rank_mask")
    mask_generation = 0  # bumped by every mask write; see _MaskUnchangedUntilBackward
    guard_recompute = True  # off when nothing recomputes a forward in backward (guard_recomputation)

    def resolve_lora_variant(self, *, config, **kwargs):
        return RankVariant()

    def rank_weights(self, adapter: str = "default") -> torch.Tensor:
        """g ⊙ m: the per-rank factor between A and B."""
        return self.lora_gate[adapter] * self.lora_rank_mask[adapter]

    def set_mask(self, mask: torch.Tensor, adapter: str = "default") -> None:
        set_masks([self], [mask], adapter)

    def set_width(self, width: int, adapter: str = "default") -> None:
        """Prefix mask: the first `width` ranks are active (elastic supernets are nested)."""
        set_widths([self], [width], adapter)

    def get_delta_weight(self, adapter) -> torch.Tensor:
        a = self.lora_A[adapter].weight.float()
        b = self.lora_B[adapter].weight.float() * self.rank_weights(adapter).float()
        return ((b @ a) * self.scaling[adapter]).to(self.lora_B[adapter].weight.dtype)


def register_rank_layer(config: LoraConfig) -> LoraConfig:
    """Make peft build RankLoraLinear for every targeted linear layer (bnb 4/8-bit layers are nn.Linear too).
    The mapping is not serialised by peft: call this again before loading a flexrank supernet."""
    config._register_custom_module({nn.Linear: RankLoraLinear})
    return config


def set_masks(layers: list[RankLoraLinear], masks: list[torch.Tensor], adapter: str = "default") -> None:
    """RankLoraLinear.set_mask for many layers in one foreach copy (a controller may re-mask every module each step)."""
    buffers = [layer.lora_rank_mask[adapter] for layer in layers]
    foreach_copy_(buffers, [m.to(device=b.device, dtype=b.dtype) for m, b in zip(masks, buffers)])
    for layer in layers:
        layer.mask_generation += 1


_PREFIX_MASKS: dict[tuple, torch.Tensor] = {}


def _prefix_mask(like: torch.Tensor, width: int) -> torch.Tensor:
    """A mask shaped like `like` with its first `width` entries 1 (Python slicing: a negative width counts from
    the end), made once per (size, width, device, dtype) on the mask's device, never written after."""
    key = (like.numel(), width, like.device, like.dtype)
    if key not in _PREFIX_MASKS:
        with torch.inference_mode(False), torch.no_grad():
            mask = torch.zeros(like.numel(), device=like.device, dtype=like.dtype)
            mask[:width] = 1
        _PREFIX_MASKS[key] = mask
    return _PREFIX_MASKS[key]


def set_widths(layers: list[RankLoraLinear], widths: list[int], adapter: str = "default") -> None:
    """RankLoraLinear.set_width for many layers in one foreach copy from cached prefix masks (no host read, and a
    couple of operators whatever the number of layers)."""
    buffers = [layer.lora_rank_mask[adapter] for layer in layers]
    foreach_copy_(buffers, [_prefix_mask(b, w).view_as(b) for b, w in zip(buffers, widths)])
    for layer in layers:
        layer.mask_generation += 1


def rank_layers(model: nn.Module) -> dict[str, RankLoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, RankLoraLinear)}


def guard_recomputation(model: nn.Module) -> bool:
    """Turn the rank layers' mask-unchanged check on where the model checkpoints activations (transformers sets
    `gradient_checkpointing` on the layers it recomputes) and off elsewhere; returns whether it is on."""
    checkpointed = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    for layer in rank_layers(model).values():
        layer.guard_recompute = checkpointed
    return checkpointed


def private_api_problems() -> list[str]:
    """One line per peft internal used here that is not as this module expects in the installed peft (empty when
    all are)."""
    problems = []

    def expect(holds: bool, what: str) -> None:
        if not holds:
            problems.append(f"peft {version('peft')}: {what} no longer holds (used by flexrank.adapters.rank_layer)")

    expect(callable(getattr(LoraConfig, "_register_custom_module", None)),
           "LoraConfig._register_custom_module({layer type: LoRA layer type}) registers a custom LoRA layer")
    resolve = inspect.signature(LoraLinear.resolve_lora_variant).parameters
    expect("config" in resolve and resolve["config"].kind is inspect.Parameter.KEYWORD_ONLY,
           "LoraLinear.resolve_lora_variant(self, *, config, **kwargs) chooses the layer's LoRA variant")
    for hook, params in {"init": ["module", "adapter_name"], "forward": ["module", "active_adapter", "x", "result"],
                         "merge_safe": ["module", "active_adapter", "orig_weight"],
                         "merge_unsafe": ["module", "active_adapter", "orig_weight"],
                         "unmerge": ["module", "active_adapter", "orig_weight"]}.items():
        fn = getattr(LoraVariant, hook, None)
        expect(fn is not None and list(inspect.signature(fn).parameters)[:len(params)] == params,
               f"LoraVariant.{hook}({', '.join(params)}, ...) is a variant hook")
    expect(isinstance(getattr(LoraLinear, "other_param_names", None), tuple),
           "LoraLinear.other_param_names lists a layer's extra per-adapter tensors")
    expect(issubclass(BufferDict, nn.Module) and "persistent" in inspect.signature(BufferDict).parameters,
           "peft.tuners._buffer_dict.BufferDict(persistent=...) holds per-adapter buffers")
    return problems
