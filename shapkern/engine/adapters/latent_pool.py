"""timm's latent attention pooling (``global_pool='map'``: SigLIP, SigLIP 2, Perception Encoder) on
packed tokens.

Each row's latent queries attend to that row's kept tokens only: a score per (token, query, head),
a softmax within each row (a segment softmax over the packed layout) and a weighted segment sum,
where timm runs dense attention over one image's tokens. The rest of the pool (output projection,
norm, MLP, pooling of several latents) runs on the (R, L, D) pooled rows as timm runs it.
"""

from __future__ import annotations

import torch

from shapkern.engine.adapters.base import Submodule
from shapkern.ops import segment_sum
from shapkern.packed import PackPlan

__all__ = ["latent_attention_pool", "latent_pool_unsupported", "segment_softmax"]


def latent_pool_unsupported(pool: Submodule) -> str | None:
    """Why the packed engine cannot run ``pool`` (for :func:`~shapkern.engine.adapters.unsupported`),
    or None when :func:`latent_attention_pool` computes what it does."""
    from timm.layers import AttentionPoolLatent

    if type(pool) is not AttentionPoolLatent:
        return f"attention pool {type(pool).__name__}"
    if pool.pos_embed is not None:  # indexed by sequence position, which dropping tokens changes
        return "a latent attention pool with its own position embedding"
    if pool.pool not in ("token", "avg"):
        return f"latent attention pool_type {pool.pool!r} (one output per latent, not per row)"
    return None


def segment_softmax(scores: torch.Tensor, plan: PackPlan) -> torch.Tensor:
    """Softmax over the tokens of each packed row: (T, ...) -> (T, ...) in float32.

    Scores of -inf get weight 0; a row without a finite score (no token to attend to) gets all zeros.
    """
    flat = scores.float().flatten(1)
    rows = plan.cu_seqlens.shape[0] - 1
    # The row maximum only keeps exp() in range; it cancels, so no gradient flows through it.
    index = plan.token_row.unsqueeze(-1).expand_as(flat)
    peak = flat.new_full((rows, flat.shape[1]), -torch.inf).scatter_reduce(0, index, flat.detach(), "amax")
    peak = torch.where(peak.isfinite(), peak, 0.0)
    exp = (flat - peak[plan.token_row]).exp()
    total = segment_sum(exp, plan.cu_seqlens)
    # A row's total is >= 1 when it has a finite score (its maximum contributes exp(0)); else 0.
    total = torch.where(total > 0, total, 1.0)
    return (exp / total[plan.token_row]).view(scores.shape)


def latent_attention_pool(
    pool: Submodule, x: torch.Tensor, plan: PackPlan, pooled: torch.Tensor | None = None
) -> torch.Tensor:
    """timm ``AttentionPoolLatent`` over each row's tokens: (T, D) -> (R, D_out).

    Args:
        pool: the model's ``attn_pool`` (see :func:`latent_pool_unsupported`).
        x: (T, D) packed tokens after the model's final norm.
        plan: the packing plan of ``x``.
        pooled: bool (T,), the tokens the pool attends to (None: all). A row with none gets a zero
            attention output, as an empty row's average pooling is zero.
    """
    tokens, latents = x.shape[0], pool.latent_len
    heads, head_dim = pool.num_heads, pool.head_dim
    q = pool.q_norm(pool.q(pool.latent[0]).view(latents, heads, head_dim))
    k, v = pool.kv(x).view(tokens, 2, heads, head_dim).unbind(1)
    k = pool.k_norm(k)
    # Scores (T, L, H) and the weighted sum in float32, as fused attention accumulates them.
    scores = (k.float().unsqueeze(1) * q.float()).sum(-1) * pool.scale
    if pooled is not None:
        scores = scores.masked_fill(~pooled.view(tokens, 1, 1), -torch.inf)
    weights = segment_softmax(scores, plan)
    attended = segment_sum((weights.unsqueeze(-1) * v.float().unsqueeze(1)).flatten(1), plan.cu_seqlens)
    out = pool.proj_drop(pool.proj(attended.to(v.dtype).view(attended.shape[0], latents, heads * head_dim)))
    if pool.mlp is not None:
        out = out + pool.mlp(pool.norm(out))
    return out[:, 0] if pool.pool == "token" else out.mean(1)
