"""Packed-path pieces for Vision Transformers that are not timm's.

A hand-written ViT evaluates coalitions on the packed path with three changes: pack its
embedded tokens (:func:`pack_tokens`), call :func:`varlen_attention` instead of dense attention
inside its blocks, and pool with :func:`segment_mean` or :func:`first_tokens`.
examples/drop_in_custom_vit.py shows the conversion.
"""

from __future__ import annotations

import torch

from shapkern.coalitions import PackPlan, pack_plan
from shapkern.ops import segment_sum, varlen_attention

__all__ = [
    "drop_path_packed",
    "first_tokens",
    "pack_tokens",
    "segment_mean",
    "segment_patch_sum",
    "varlen_attention",
]


def pack_tokens(
    tokens: torch.Tensor, coalitions: torch.Tensor, num_prefix_tokens: int, *, paired: bool = False
) -> tuple[torch.Tensor, PackPlan]:
    """Gather the kept tokens of every (image, coalition) pair into one flat tensor.

    Args:
        tokens: (B, P + N, D) embedded tokens, prefix tokens first.
        coalitions: bool (B, M, N) kept patches.
        num_prefix_tokens: P.
        paired: coalitions 2i and 2i+1 are complements (no host sync, see :func:`pack_plan`).

    Returns:
        packed (T, D) and the plan; row r = b * M + m holds image b under coalition m.
    """
    batch, num, players = coalitions.shape
    if tokens.shape[:2] != (batch, num_prefix_tokens + players):
        raise ValueError(
            f"tokens must be (B, P + N, D) = ({batch}, {num_prefix_tokens + players}, D) for coalitions "
            f"{tuple(coalitions.shape)} and {num_prefix_tokens} prefix tokens, got {tuple(tokens.shape)}"
        )
    row_image = torch.arange(batch, device=coalitions.device).repeat_interleave(num)
    plan = pack_plan(coalitions.reshape(batch * num, players), row_image, num_prefix_tokens, paired=paired)
    return tokens.reshape(-1, tokens.shape[-1])[plan.gather_index], plan


def segment_patch_sum(x: torch.Tensor, plan: PackPlan) -> torch.Tensor:
    """Sum over each row's kept patch tokens, prefix tokens excluded: (T, D) -> (R, D)."""
    is_patch = (plan.token_patch >= 0).unsqueeze(-1).to(x.dtype)
    return segment_sum(x * is_patch, plan.cu_seqlens)


def segment_mean(x: torch.Tensor, plan: PackPlan) -> torch.Tensor:
    """Mean over each row's kept patch tokens, prefix tokens excluded: (T, D) -> (R, D).

    A row with no kept patches gives zeros.
    """
    return segment_patch_sum(x, plan) / plan.patch_counts.clamp(min=1).unsqueeze(-1).to(x.dtype)


def first_tokens(x: torch.Tensor, plan: PackPlan, count: int) -> torch.Tensor:
    """The first ``count`` tokens (the prefix tokens) of every row: (T, D) -> (R, count, D)."""
    offsets = torch.arange(count, device=x.device)
    return x[plan.cu_seqlens[:-1].long().unsqueeze(-1) + offsets]


def drop_path_packed(x: torch.Tensor, drop_prob: float, plan: PackPlan, *, scale_by_keep: bool = True):
    """Stochastic depth per packed sequence, as timm's DropPath drops per sample: (T, D) -> (T, D)."""
    if drop_prob == 0.0:
        return x
    keep_prob = 1.0 - drop_prob
    keep = x.new_empty(plan.patch_counts.shape[0]).bernoulli_(keep_prob)
    if scale_by_keep and keep_prob > 0.0:
        keep.div_(keep_prob)
    return x * keep[plan.token_row].unsqueeze(-1)
