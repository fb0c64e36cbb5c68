"""PyTorch's ``nn.MultiheadAttention`` on packed tokens, for the adapters of models built on it
(open_clip's residual blocks, SigLIP's attention-pooling head).

Self-attention runs through the engine's varlen attention op; a learned query pooling each row's
tokens (one query, as attention-pooling heads use) is a softmax over the row's kept tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shapkern.ops import segment_sum
from shapkern.packed import AttentionFn, PackPlan

__all__ = ["multihead_unsupported", "packed_query_pool", "packed_self_attention"]


def multihead_unsupported(attn: nn.MultiheadAttention) -> str | None:
    """Why the packed engine cannot run ``attn``, or None: it runs packed q/k/v projections of one
    width, without bias_kv, zero attention or attention dropout in train mode."""
    if not attn._qkv_same_embed_dim:
        return "nn.MultiheadAttention with kdim/vdim other than embed_dim"
    if attn.bias_k is not None or attn.add_zero_attn:
        return "nn.MultiheadAttention with add_bias_kv or add_zero_attn"
    if attn.training and attn.dropout > 0:
        return "attention dropout in train mode"
    return None


def _projections(attn: nn.MultiheadAttention) -> tuple[tuple[torch.Tensor, torch.Tensor | None], ...]:
    """(weight, bias) of the q, k and v projections packed in ``in_proj_weight``."""
    biases = (None,) * 3 if attn.in_proj_bias is None else attn.in_proj_bias.chunk(3)
    return tuple(zip(attn.in_proj_weight.chunk(3), biases, strict=True))


def packed_self_attention(
    attn: nn.MultiheadAttention, x: torch.Tensor, plan: PackPlan, attention: AttentionFn
) -> torch.Tensor:
    """``attn(x, x, x)[0]`` within each packed sequence: (T, D) -> (T, D)."""
    tokens = x.shape[0]
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(tokens, 3, attn.num_heads, attn.head_dim).unbind(1)
    out = attention(q, k, v, plan.cu_seqlens, plan.max_seqlen, scale=attn.head_dim**-0.5)
    return attn.out_proj(out.reshape(tokens, attn.embed_dim))


def packed_query_pool(
    attn: nn.MultiheadAttention, query: torch.Tensor, x: torch.Tensor, plan: PackPlan
) -> torch.Tensor:
    """``attn(query, x, x)[0]`` per row, one learned query (D,) over the row's packed tokens x (T, D):
    -> (R, D). The softmax runs in fp32 over each row's kept tokens; a row without tokens pools zeros
    (its output is ``out_proj``'s bias)."""
    heads, head_dim = attn.num_heads, attn.head_dim
    (w_q, b_q), (w_k, b_k), (w_v, b_v) = _projections(attn)
    q = F.linear(query, w_q, b_q).view(heads, head_dim)
    k, v = (F.linear(x, w, b).unflatten(-1, (heads, head_dim)) for w, b in ((w_k, b_k), (w_v, b_v)))
    scores = (k * q).sum(-1).float() * head_dim**-0.5  # (T, H)
    rows, row = plan.patch_counts.shape[0], plan.token_row
    # Softmax is invariant to a per-row shift: the row maximum keeps exp in range, without a gradient.
    peak = scores.new_full((rows, heads), float("-inf"))
    peak = peak.scatter_reduce(0, row.unsqueeze(-1).expand(-1, heads), scores.detach(), "amax")
    weights = (scores - peak[row]).exp()
    sums = segment_sum(
        torch.cat([weights, (weights.unsqueeze(-1) * v.float()).flatten(1)], 1), plan.cu_seqlens
    )
    total, pooled = sums[:, :heads], sums[:, heads:].view(rows, heads, head_dim)
    pooled = pooled / torch.where(total > 0, total, 1.0).unsqueeze(-1)
    return attn.out_proj(pooled.flatten(1).to(v.dtype))
