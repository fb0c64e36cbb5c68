"""timm Blocks on packed tokens: the model's own modules, plain or with fused kernels.

The plain path calls each Block's modules on (T, D) packed tokens with varlen attention. The fused
path runs the same math with fewer passes over memory: each residual add is fused into the next
LayerNorm (``ops.add_layer_norm``) and fc1's bias and GELU into its GEMM (``ops.linear_gelu``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import torch
from torch import nn

from shapkern.ops import add_layer_norm, layer_norm, linear_gelu
from shapkern.packed import AttentionFn, PackPlan, drop_path_packed, planned_attention

__all__ = [
    "compiled_block_forward",
    "fused_blocks_forward",
    "packed_block_forward",
    "layer_scaled_block",
    "packed_drop_path",
    "residual_branch",
    "supports_fused_blocks",
]

# timm's modules are read here by attribute (block.attn.qkv, mlp.fc1, ...), which nn.Module types as
# Tensor | Module: the blocks and their parts are typed Any (the model's adapter checks what they hold).
TimmModule = Any


def packed_drop_path(module: TimmModule, x: torch.Tensor, plan: PackPlan) -> torch.Tensor:
    """A timm DropPath module (or Identity) on packed tokens: per sequence, as timm drops per sample."""
    if not module.training or isinstance(module, nn.Identity):
        return x
    return drop_path_packed(x, module.drop_prob, plan, scale_by_keep=module.scale_by_keep)


def layer_scaled_block(
    block: TimmModule, x: torch.Tensor, plan: PackPlan, attend: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """A pre-norm block whose branches carry optional LayerScale factors ``gamma_1``/``gamma_2``
    (timm's Beit and Eva blocks) on packed tokens: x + drop(γ1 · attend(norm1 x)), then
    x + drop(γ2 · mlp(norm2 x)). ``attend`` is the family's attention on (T, D) -> (T, D)."""
    attended = attend(block.norm1(x))
    if block.gamma_1 is not None:
        attended = block.gamma_1 * attended
    x = x + packed_drop_path(block.drop_path1, attended, plan)
    branch = block.mlp(block.norm2(x))
    if block.gamma_2 is not None:
        branch = block.gamma_2 * branch
    return x + packed_drop_path(block.drop_path2, branch, plan)


def _attention(attn: TimmModule, x: torch.Tensor, plan: PackPlan, attention) -> torch.Tensor:
    """timm Attention on packed tokens: (T, D) -> (T, D)."""
    tokens = x.shape[0]
    q, k, v = attn.qkv(x).view(tokens, 3, attn.num_heads, attn.head_dim).unbind(1)
    # Under autocast, q/k norms return fp32 while v keeps the autocast dtype; attention takes one dtype.
    q, k = attn.q_norm(q).to(v.dtype), attn.k_norm(k).to(v.dtype)
    out = attention(q, k, v, plan.cu_seqlens, plan.max_seqlen, scale=attn.scale)
    out = attn.norm(out.reshape(tokens, attn.num_heads * attn.head_dim))
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def packed_block_forward(
    block: TimmModule, x: torch.Tensor, plan: PackPlan, attention: AttentionFn = planned_attention
) -> torch.Tensor:
    """One timm Block on packed tokens: (T, D) -> (T, D).

    ``attention(q, k, v, cu_seqlens, max_seqlen, scale=...)`` maps (T, H, Dh) to (T, H, Dh).
    """
    attended = _attention(block.attn, block.norm1(x), plan, attention)
    x = x + packed_drop_path(block.drop_path1, block.ls1(attended), plan)
    return x + packed_drop_path(block.drop_path2, block.ls2(block.mlp(block.norm2(x))), plan)


@cache
def compiled_block_forward():
    # Inductor fuses the memory-bound work between the GEMMs (residual + LayerNorm, bias + GELU);
    # the attention op stays one custom op. Blocks of one model share the compiled code (their
    # parameters are graph inputs); shapes turn dynamic after a first change of T.
    return torch.compile(packed_block_forward)


def _fusable_norm(norm: nn.Module) -> bool:
    return isinstance(norm, nn.LayerNorm) and norm.weight is not None and norm.bias is not None


def supports_fused_blocks(model: TimmModule) -> bool:
    """Whether every Block is plain timm pre-norm with affine LayerNorms, an ``Mlp`` whose fc1 is a
    biased Linear followed by exact GELU, and LayerScale or nothing: what the fused path computes."""
    from timm.layers import LayerScale, Mlp

    for block in model.blocks:
        mlp = block.mlp
        if not (_fusable_norm(block.norm1) and _fusable_norm(block.norm2) and type(mlp) is Mlp):
            return False
        if not (type(mlp.fc1) is nn.Linear and mlp.fc1.bias is not None):
            return False
        if not (type(mlp.act) is nn.GELU and mlp.act.approximate == "none"):
            return False
        if not all(isinstance(ls, (nn.Identity, LayerScale)) for ls in (block.ls1, block.ls2)):
            return False
    return True


def residual_branch(layer_scale: TimmModule, drop_path: TimmModule, branch: torch.Tensor, plan: PackPlan):
    """(branch, gamma) for add_layer_norm. An active drop path scales rows after LayerScale, so
    both are applied to the branch first; otherwise LayerScale's gamma goes into the fused add."""
    if drop_path.training and not isinstance(drop_path, nn.Identity):
        return packed_drop_path(drop_path, layer_scale(branch), plan), None
    return branch, getattr(layer_scale, "gamma", None)


def fused_blocks_forward(
    model: TimmModule, x: torch.Tensor, plan: PackPlan, attention: AttentionFn
) -> torch.Tensor:
    """All of ``model.blocks`` on packed tokens with fused kernels: (T, D) -> (T, D), the residual
    stream after the last block (as the plain path returns it). Needs :func:`supports_fused_blocks`."""
    device = x.device.type
    # The LayerNorm writes h straight in the GEMM's dtype under autocast: no separate cast pass.
    act = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    blocks = list(model.blocks)
    norm = blocks[0].norm1
    h = layer_norm(x, norm.weight, norm.bias, norm.eps, out_dtype=act)
    for index, block in enumerate(blocks):
        attended = _attention(block.attn, h, plan, attention)
        branch, gamma = residual_branch(block.ls1, block.drop_path1, attended, plan)
        norm = block.norm2
        x, h = add_layer_norm(x, branch, norm.weight, norm.bias, norm.eps, gamma, out_dtype=act)
        mlp = block.mlp
        hidden = mlp.norm(mlp.drop1(linear_gelu(h, mlp.fc1.weight, mlp.fc1.bias)))
        branch, gamma = residual_branch(block.ls2, block.drop_path2, mlp.drop2(mlp.fc2(hidden)), plan)
        if index + 1 == len(blocks):  # the model's own final norm follows (often on prefix tokens only)
            return x + (branch if gamma is None else branch * gamma)
        norm = blocks[index + 1].norm1
        x, h = add_layer_norm(x, branch, norm.weight, norm.bias, norm.eps, gamma, out_dtype=act)
    return x
