"""The fp8 block path: timm Blocks on packed tokens with their qkv, proj, fc1 and fc2 GEMMs in e4m3.

Forward only (explanations, metrics, forward-only training targets). Each of the four GEMMs multiplies an
activation quantised per row on the fly by a weight quantised per output channel (``ops.fp8_linear``);
the activation quantisation is fused into the op that produces the activation where shapkern owns it:
LayerNorm and residual add + LayerNorm before qkv and fc1, GELU before fc2; the attention output takes
one separate quantisation pass before proj. Attention, LayerNorm, softmax, GELU, the residual stream, the
prefix tokens and the model's head are computed as on the plain path, in the model's dtype; the GEMMs
write the autocast dtype under autocast, else the model's dtype.

**Weight cache.** The e4m3 weights and scales of every qkv, proj, fc1 and fc2 Linear are computed once and
kept in a module-level ``WeakKeyDictionary`` keyed by the Linear module (so per model, and freed with it).
An entry is valid while its weight has the same ``data_ptr``, ``_version``, dtype, device and shape:
in-place updates (optimizer steps, ``load_state_dict``, ``copy_`` under ``no_grad``) bump ``_version``,
and moves or replacements (``.to()``, ``.half()``, assigning a new Parameter) change ``data_ptr``. The
entry holds a reference to the weight it was made from, so that while it lives no other tensor can be
allocated at that address. Writes through ``weight.data`` bypass the version counter (as they bypass
autograd): call :func:`clear_fp8_weights` after them. Inference tensors have no version counter and are
quantised on every call, never cached.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from shapkern.engine.blocks import TimmModule, residual_branch, supports_fused_blocks
from shapkern.ops import (
    add_layer_norm_quantize,
    check_fp8_device,
    fp8_linear,
    layer_norm_quantize,
    quantize_rows,
    quantize_weight,
    supports_fp8,
)
from shapkern.ops.fp8_linear import FORWARD_ONLY
from shapkern.packed import AttentionFn, PackPlan

__all__ = [
    "check_fp8_blocks",
    "check_fp8_forward_only",
    "clear_fp8_weights",
    "fp8_blocks_forward",
    "fp8_weight",
    "supports_fp8",
    "supports_fp8_blocks",
]


@dataclass(frozen=True)
class _CachedWeight:
    key: tuple
    source: torch.Tensor  # the weight it was made from: its address cannot be reused while cached
    weight: torch.Tensor  # (N, K) e4m3
    scale: torch.Tensor  # (1, N) fp32


_WEIGHTS: weakref.WeakKeyDictionary[nn.Module, _CachedWeight] = weakref.WeakKeyDictionary()


def _weight_key(weight: torch.Tensor) -> tuple | None:
    if weight.is_inference():  # no version counter
        return None
    return (weight.data_ptr(), weight._version, weight.dtype, weight.device, tuple(weight.shape))


def fp8_weight(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """The Linear's weight in e4m3 (N, K) and its per-output-channel scales (1, N) fp32, from the cache
    while the weight is unchanged (see the module docstring), else quantised and cached."""
    weight = linear.weight
    key = _weight_key(weight)
    cached = _WEIGHTS.get(linear)
    if cached is not None and key is not None and cached.key == key:
        return cached.weight, cached.scale
    quantized, scale = quantize_weight(weight)
    if key is not None:
        _WEIGHTS[linear] = _CachedWeight(key, weight.detach(), quantized, scale)
    return quantized, scale


def clear_fp8_weights(model: nn.Module | None = None) -> None:
    """Drop the cached e4m3 weights of ``model``'s Linear layers (of every model when None)."""
    if model is None:
        _WEIGHTS.clear()
        return
    for module in model.modules():
        _WEIGHTS.pop(module, None)


def supports_fp8_blocks(model: TimmModule) -> bool:
    """Whether the fp8 path computes ``model``'s blocks: those :func:`supports_fused_blocks` accepts, with
    nn.Linear qkv, proj and fc2 and no gated attention (its gate reads the unquantised LayerNorm output)."""
    if not supports_fused_blocks(model):
        return False
    for block in model.blocks:
        attn = block.attn
        if getattr(attn, "gate", None) is not None:
            return False
        if not all(type(linear) is nn.Linear for linear in (attn.qkv, attn.proj, block.mlp.fc2)):
            return False
    return True


def check_fp8_blocks(model: nn.Module, images: torch.Tensor) -> None:
    """Raise unless the fp8 path can run ``model`` on ``images``: the device (:func:`supports_fp8`,
    RuntimeError) and the blocks (:func:`supports_fp8_blocks`, NotImplementedError). Whether
    gradients are asked for depends on the grad mode of each call: :func:`check_fp8_forward_only`."""
    check_fp8_device(images.device)
    if not supports_fp8_blocks(model):
        raise NotImplementedError(
            f"precision='fp8' needs timm Blocks with affine LayerNorms, Linear qkv and proj without a "
            f"gate, an Mlp of Linear + exact GELU + Linear and LayerScale or none; {type(model).__name__} "
            "has others. Use precision='auto'."
        )


def check_fp8_forward_only(model: nn.Module, images: torch.Tensor) -> None:
    """A RuntimeError when a call asks for gradients (grad mode with images or parameters that
    require grad): the fp8 path is forward only."""
    if torch.is_grad_enabled() and (images.requires_grad or any(p.requires_grad for p in model.parameters())):
        raise RuntimeError(FORWARD_ONLY)


def _linear(linear: nn.Linear, x: torch.Tensor, dtype: torch.dtype, x_scale: torch.Tensor | None = None):
    weight, scale = fp8_weight(linear)
    return fp8_linear(x, weight, scale, linear.bias, out_dtype=dtype, x_scale=x_scale)


def _active(dropout: TimmModule) -> bool:
    return dropout.training and dropout.p > 0


def _attention(attn: TimmModule, h, plan: PackPlan, attention: AttentionFn, dtype: torch.dtype):
    """timm Attention on the quantised LayerNorm output h = (q (T, D) e4m3, scale (T, 1)): (T, D)."""
    tokens = h[0].shape[0]
    qkv = _linear(attn.qkv, h[0], dtype, h[1])
    q, k, v = qkv.view(tokens, 3, attn.num_heads, attn.head_dim).unbind(1)
    # Under autocast, q/k norms return fp32 while v keeps the autocast dtype; attention takes one dtype.
    q, k = attn.q_norm(q).to(v.dtype), attn.k_norm(k).to(v.dtype)
    out = attention(q, k, v, plan.cu_seqlens, plan.max_seqlen, scale=attn.scale)
    out = attn.norm(out.reshape(tokens, attn.num_heads * attn.head_dim))
    return attn.proj_drop(_linear(attn.proj, out, dtype))


def _mlp(mlp: TimmModule, h, dtype: torch.dtype) -> torch.Tensor:
    """timm Mlp on the quantised LayerNorm output h: fc1, then GELU fused into fc2's input quantisation
    (unless a dropout or norm sits between them), fc2. (T, D) -> (T, D)."""
    z = _linear(mlp.fc1, h[0], dtype, h[1])
    if isinstance(mlp.norm, nn.Identity) and not _active(mlp.drop1):
        hidden = quantize_rows(z, gelu=True)
    else:
        hidden = quantize_rows(mlp.norm(mlp.drop1(mlp.act(z))))
    return mlp.drop2(_linear(mlp.fc2, hidden[0], dtype, hidden[1]))


def fp8_blocks_forward(
    model: TimmModule, x: torch.Tensor, plan: PackPlan, attention: AttentionFn
) -> torch.Tensor:
    """All of ``model.blocks`` on packed tokens with e4m3 GEMMs: (T, D) -> (T, D), the residual stream
    after the last block (as the plain path returns it). Needs :func:`check_fp8_blocks`; forward only."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    blocks = list(model.blocks)
    norm = blocks[0].norm1
    h: Sequence[torch.Tensor] = layer_norm_quantize(x, norm.weight, norm.bias, norm.eps)  # q, scale
    for index, block in enumerate(blocks):
        attended = _attention(block.attn, h, plan, attention, dtype)
        branch, gamma = residual_branch(block.ls1, block.drop_path1, attended, plan)
        norm = block.norm2
        x, *h = add_layer_norm_quantize(x, branch, norm.weight, norm.bias, norm.eps, gamma)
        branch, gamma = residual_branch(block.ls2, block.drop_path2, _mlp(block.mlp, h, dtype), plan)
        if index + 1 == len(blocks):  # the model's own final norm follows
            return x + (branch if gamma is None else branch * gamma)
        norm = blocks[index + 1].norm1
        x, *h = add_layer_norm_quantize(x, branch, norm.weight, norm.bias, norm.eps, gamma)
    return x
