"""The packed layout: all kept tokens of all (image, coalition) rows as one flat (T, D) tensor.

A coalition row's sequence is its P prefix tokens (class, register, distillation; always kept)
followed by its kept patches in patch order; sequences are delimited by ``cu_seqlens`` (R + 1,),
FlashAttention's varlen convention (docs/design.md, "Packing layout"). Linear layers then run as
single GEMMs over T rows and attention runs per sequence.

The pieces here are also what a hand-written ViT needs to run coalitions on the packed path: pack
its embedded tokens (:func:`pack_tokens`), call :func:`varlen_attention` instead of dense
attention inside its blocks, and pool with :func:`segment_mean` or :func:`first_tokens`;
examples/drop_in_custom_vit.py shows the conversion.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from shapkern._deprecation import renamed_arguments
from shapkern.ops import segment_sum, varlen_attention
from shapkern.ops.varlen_attention import AttentionFn

__all__ = [
    "AttentionFn",
    "PackPlan",
    "drop_path_packed",
    "first_tokens",
    "pack_plan",
    "planned_attention",
    "planned_pair_attention",
    "pack_tokens",
    "segment_mean",
    "segment_patch_sum",
    "varlen_attention",
]

NOT_COMPLEMENTS = (
    "paired=True, but coalitions 2i and 2i+1 are not complements of each other; sample them with "
    "sample_coalitions(..., paired=True) or pass paired=False"
)


def planned_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    *,
    bias: torch.Tensor | None = None,
    bias_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`varlen_attention` on a plan built by :func:`pack_plan`, which is valid by construction:
    no value checks of ``cu_seqlens`` (or of ``bias_index``, built with the plan), so no host sync.
    (T, H, D) -> (T, H, D)."""
    return varlen_attention(
        q, k, v, cu_seqlens, max_seqlen, scale, bias=bias, bias_index=bias_index, validate=False
    )


def planned_pair_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    *,
    bias: torch.Tensor | None = None,
    bias_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`planned_attention` for a paired plan (complementary coalitions): each pair's tokens are
    one row of 2P + N, attended as a dense row with a block-diagonal mask (``pairs=True``)."""
    return varlen_attention(
        q, k, v, cu_seqlens, max_seqlen, scale, bias=bias, bias_index=bias_index, validate=False, pairs=True
    )


@dataclass
class PackPlan:
    """Where every kept token of R (image, coalition) rows goes in the packed layout.

    Attributes:
        gather_index: (T,) int64 rows of the per-image token table (B * (P + N), D).
        cu_seqlens: (R + 1,) int32 sequence boundaries, FlashAttention varlen convention.
        max_seqlen: upper bound on sequence lengths, P + N (static, so no host sync).
        token_patch: (T,) int64 patch index of each packed token; negative for prefix tokens.
        patch_counts: (R,) int64 kept patches per row.
        row_image: (R,) int64 image index of each row.
        num_prefix_tokens: P.
    """

    gather_index: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    token_patch: torch.Tensor
    patch_counts: torch.Tensor
    row_image: torch.Tensor
    num_prefix_tokens: int

    @property
    def num_tokens(self) -> int:
        return self.gather_index.shape[0]

    @cached_property
    def token_row(self) -> torch.Tensor:
        """(T,) int64 row (sequence) index of every packed token."""
        lengths = self.patch_counts + self.num_prefix_tokens
        return torch.repeat_interleave(
            torch.arange(lengths.shape[0], device=lengths.device), lengths, output_size=self.num_tokens
        )


def _complementary(coalitions: torch.Tensor) -> torch.Tensor:
    """Whether rows 2i and 2i+1 of bool (R, N), R even, are complements: a bool scalar tensor."""
    pairs = coalitions.view(coalitions.shape[0] // 2, 2, coalitions.shape[1])
    return (pairs[:, 0] ^ pairs[:, 1]).all()


@renamed_arguments(masks="coalitions")
def pack_plan(
    coalitions: torch.Tensor,
    row_image: torch.Tensor,
    num_prefix_tokens: int,
    *,
    paired: bool | None = None,
) -> PackPlan:
    """Plan the packed layout of R coalition rows.

    Args:
        coalitions: bool (R, N), the kept patches of each row.
        row_image: int64 (R,), the image each row belongs to.
        num_prefix_tokens: P, tokens kept in every row ahead of its patches.
        paired: rows 2i and 2i+1 are complements (True), are not (False), or detect it (None, one
            host read). Paired, T is known, R*P + (R/2)*N, and the plan makes no host sync on CUDA,
            where the pairing is checked asynchronously on the device (on the CPU it is checked at
            once). Otherwise T is read back once. The layout is the same either way.

    Each row's sequence is its P prefix tokens followed by its kept patches in patch order.
    """
    rows, players = coalitions.shape
    width = num_prefix_tokens + players
    if paired is None:
        paired = rows > 0 and rows % 2 == 0 and bool(_complementary(coalitions))
    if paired:
        if rows % 2:
            raise ValueError(f"paired=True needs an even number of coalition rows, got {rows}")
        complementary = _complementary(coalitions)
        if coalitions.device.type == "cpu" and not complementary:
            raise ValueError(NOT_COMPLEMENTS)
        torch._assert_async(complementary, NOT_COMPLEMENTS)
        total = rows * num_prefix_tokens + rows // 2 * players
    patch_counts = coalitions.sum(-1)
    keep = torch.cat([coalitions.new_ones(rows, num_prefix_tokens), coalitions], dim=1).view(-1)
    if paired:
        flat = torch.nonzero_static(keep, size=total).view(-1)
    else:
        flat = keep.nonzero().view(-1)
    column = flat % width
    lengths = (patch_counts + num_prefix_tokens).to(torch.int32)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return PackPlan(
        gather_index=row_image[flat // width] * width + column,
        cu_seqlens=cu_seqlens,
        max_seqlen=width,
        token_patch=column - num_prefix_tokens,
        patch_counts=patch_counts,
        row_image=row_image,
        num_prefix_tokens=num_prefix_tokens,
    )


def pack_tokens(
    tokens: torch.Tensor, coalitions: torch.Tensor, num_prefix_tokens: int, *, paired: bool | None = None
) -> tuple[torch.Tensor, PackPlan]:
    """Gather the kept tokens of every (image, coalition) pair into one flat tensor.

    Args:
        tokens: (B, P + N, D) embedded tokens, prefix tokens first.
        coalitions: bool (B, M, N) kept patches.
        num_prefix_tokens: P.
        paired: coalitions 2i and 2i+1 are complements (no host sync), are not, or None: detect
            it (see :func:`pack_plan`).

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
    # index_select, not x[index]: its backward (index_add) sums each image's token gradients in a fixed
    # order on the CPU, where indexing's backward adds with atomics in parallel (run-to-run differences).
    return torch.index_select(tokens.reshape(-1, tokens.shape[-1]), 0, plan.gather_index), plan


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
