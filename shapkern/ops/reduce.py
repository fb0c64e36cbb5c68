"""Reductions over coalitions: segment sums of packed tokens and weighted sums onto players of
bit-packed coalitions (:mod:`shapkern.ops.bitpack`; the Gram matrix is in :mod:`shapkern.ops.gram`).

Each op has a plain PyTorch reference (``*_reference``). The public op validates its inputs, then runs
``torch.ops.shapkern.*`` when there are kernels for the tensors' device, and the reference otherwise:
C++ on the CPU; on CUDA, the extension's CUDA kernels, except for ``coalition_reduce`` in float32,
float16 and bfloat16, which runs a Triton tensor-core GEMM on the packed coalitions
(``shapkern.kernels.coalition_reduce``; fp32 products carried as two tf32 parts, see there).
The kernels are deterministic on CPU and CUDA: every output is reduced in a fixed order, without
float atomics. Half types (float16, bfloat16) accumulate in float32, float64 in float64. The ops
support autograd for floating inputs and trace under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch

from shapkern._deprecation import moved_names
from shapkern.ops import _extension as _ext
from shapkern.ops._checks import (
    acc_dtype,
    check,
    check_cu_seqlens,
    check_float,
    check_packed,
    check_same_device,
    num_words,
)
from shapkern.ops.bitpack import unpack_coalitions_reference

try:
    from shapkern.kernels import coalition_reduce as _gemm

    _HAS_TRITON = True
except ImportError:  # no triton: CUDA tensors take the extension's CUDA kernels or the references
    _HAS_TRITON = False

__all__ = [
    "coalition_reduce",
    "coalition_reduce_reference",
    "segment_expand",
    "segment_expand_reference",
    "segment_sum",
    "segment_sum_reference",
]

# Deprecated names (removed in the next release): the bit packing is in shapkern.ops.bitpack.
__getattr__ = moved_names(
    __name__,
    {
        f"{old}{suffix}": f"shapkern.ops.bitpack.{new}{suffix}"
        for old, new in (("pack_masks", "pack_coalitions"), ("unpack_masks", "unpack_coalitions"))
        for suffix in ("", "_reference")
    },
)

# ---------------------------------------------------------------------------------------- segment_sum


def segment_sum_reference(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """PyTorch reference of :func:`segment_sum`: index_add over a token -> sequence index."""
    num_seqs = cu_seqlens.shape[0] - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq = torch.repeat_interleave(
        torch.arange(num_seqs, device=values.device), lengths, output_size=values.shape[0]
    )
    acc = acc_dtype(values.dtype)
    out = values.new_zeros((num_seqs, values.shape[1]), dtype=acc).index_add(0, seq, values.to(acc))
    return out.to(values.dtype)


def segment_sum(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Sum the packed tokens of each sequence.

    Args:
        values: (T, K) floating, the tokens of all sequences back to back.
        cu_seqlens: (R+1,) int32, sequence r holds tokens ``cu_seqlens[r]:cu_seqlens[r+1]``;
            ``cu_seqlens[0] == 0``, non-decreasing, ``cu_seqlens[-1] == T``.

    Returns:
        (R, K) in the dtype of ``values``; empty sequences give 0. The gradient broadcasts back to
        the tokens.
    """
    op = "segment_sum"
    check(values.dim() == 2, op, f"values must be 2-D (T, K), got shape {tuple(values.shape)}")
    check_float(values, "values", op)
    check_same_device(op, values=values, cu_seqlens=cu_seqlens)
    check_cu_seqlens(cu_seqlens, values.shape[0], op)
    if _ext.has_kernels(values.device):
        return torch.ops.shapkern.segment_sum(values, cu_seqlens)
    return segment_sum_reference(values, cu_seqlens)


def segment_expand_reference(values: torch.Tensor, cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """PyTorch reference of :func:`segment_expand`: repeat_interleave by the sequence lengths."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return values.repeat_interleave(lengths, dim=0, output_size=num_tokens)


def segment_expand(values: torch.Tensor, cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Copy each sequence's row to all of its packed tokens (the adjoint of :func:`segment_sum`).

    Args:
        values: (R, K) floating, one row per sequence.
        cu_seqlens: (R+1,) int32, sequence r holds tokens ``cu_seqlens[r]:cu_seqlens[r+1]``;
            ``cu_seqlens[0] == 0``, non-decreasing, ``cu_seqlens[-1] == num_tokens``.
        num_tokens: T.

    Returns:
        (T, K) in the dtype of ``values``; the gradient is the segment sum of the tokens' gradients.
    """
    op = "segment_expand"
    check(values.dim() == 2, op, f"values must be 2-D (R, K), got shape {tuple(values.shape)}")
    check_float(values, "values", op)
    check_same_device(op, values=values, cu_seqlens=cu_seqlens)
    check(
        cu_seqlens.dim() == 1 and values.shape[0] == cu_seqlens.shape[0] - 1,
        op,
        f"values has {values.shape[0]} rows but cu_seqlens (shape {tuple(cu_seqlens.shape)}) "
        f"holds {cu_seqlens.shape[0] - 1} sequences",
    )
    check_cu_seqlens(cu_seqlens, num_tokens, op)
    if _ext.has_kernels(values.device):
        return torch.ops.shapkern.segment_expand(values, cu_seqlens, num_tokens)
    return segment_expand_reference(values, cu_seqlens, num_tokens)


# ----------------------------------------------------------------------------------- coalition_reduce


def coalition_reduce_reference(
    packed: torch.Tensor, values: torch.Tensor, weights: torch.Tensor, num_players: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of :func:`coalition_reduce`: einsum over the unpacked coalitions."""
    acc = acc_dtype(values.dtype)
    z = unpack_coalitions_reference(packed, num_players).to(acc)
    w = weights.to(acc)
    sums = torch.einsum("bmn,bm,bmk->bnk", z, w, values.to(acc))
    weight_sums = torch.einsum("bmn,bm->bn", z, w)
    return sums.to(values.dtype), weight_sums.to(values.dtype)


def coalition_reduce(
    packed: torch.Tensor, values: torch.Tensor, weights: torch.Tensor, num_players: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sums of coalition values onto the players in each coalition.

    ``sums[b, n, k] = sum_m weights[b, m] z[b, m, n] values[b, m, k]`` and
    ``weight_sums[b, n] = sum_m weights[b, m] z[b, m, n]``, where z is ``packed`` unpacked
    (:func:`~shapkern.ops.unpack_coalitions`).

    Args:
        packed: (B, M, W) int32, bit-packed coalitions (:func:`~shapkern.ops.pack_coalitions`),
            W >= ceil(N / 32).
        values: (B, M, K) floating, the value of each coalition.
        weights: (B, M), dtype of ``values``, a weight per coalition.
        num_players: N.

    Returns:
        sums (B, N, K) and weight_sums (B, N), in the dtype of ``values``; differentiable in
        ``values`` and ``weights``. On CUDA, float32/float16/bfloat16 run as tensor-core GEMMs (forward
        and backward) with fp32 accuracy; float64 runs the exact CUDA kernel.
    """
    op = "coalition_reduce"
    check_packed(packed, num_players, op)
    check(values.dim() == 3, op, f"values must be 3-D (B, M, K), got shape {tuple(values.shape)}")
    check_float(values, "values", op)
    check(weights.dim() == 2, op, f"weights must be 2-D (B, M), got shape {tuple(weights.shape)}")
    check(
        weights.dtype == values.dtype,
        op,
        f"weights must have the dtype of values ({values.dtype}), got {weights.dtype}",
    )
    check(
        packed.shape[:2] == values.shape[:2],
        op,
        f"packed shape {tuple(packed.shape)} does not match values shape {tuple(values.shape)} in (B, M)",
    )
    check(
        weights.shape == values.shape[:2],
        op,
        f"weights shape {tuple(weights.shape)} does not match values shape {tuple(values.shape)} in (B, M)",
    )
    check_same_device(op, values=values, packed=packed, weights=weights)
    if _HAS_TRITON and values.is_cuda and values.dtype != torch.float64:
        return torch.ops.shapkern.coalition_reduce_gemm(packed, values, weights, num_players)
    if _ext.has_kernels(values.device):
        return torch.ops.shapkern.coalition_reduce(packed, values, weights, num_players)
    return coalition_reduce_reference(packed, values, weights, num_players)


@torch.library.custom_op("shapkern::coalition_reduce_gemm", mutates_args=())
def _reduce_gemm(
    packed: torch.Tensor, values: torch.Tensor, weights: torch.Tensor, num_players: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return _gemm.coalition_reduce_forward(packed, values, weights, num_players)


@_reduce_gemm.register_fake
def _(packed, values, weights, num_players):
    batch, _, k = values.shape
    return values.new_empty((batch, num_players, k)), values.new_empty((batch, num_players))


@torch.library.custom_op("shapkern::coalition_reduce_gemm_backward", mutates_args=())
def _reduce_gemm_backward(
    grad_sums: torch.Tensor,
    grad_weight_sums: torch.Tensor,
    packed: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    num_players: int,
    need_values: bool,
    need_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_values, grad_weights); one not asked for is an empty (0,) tensor (no None outputs)."""
    grad_values, grad_weights = _gemm.coalition_reduce_backward(
        grad_sums, grad_weight_sums, packed, values, weights, num_players, need_values, need_weights
    )
    return (
        values.new_empty((0,)) if grad_values is None else grad_values,
        weights.new_empty((0,)) if grad_weights is None else grad_weights,
    )


@_reduce_gemm_backward.register_fake
def _(grad_sums, grad_weight_sums, packed, values, weights, num_players, need_values, need_weights):
    return values.new_empty(values.shape if need_values else (0,)), weights.new_empty(
        weights.shape if need_weights else (0,)
    )


def _reduce_gemm_setup(ctx, inputs, output):
    packed, values, weights, num_players = inputs
    ctx.save_for_backward(packed, values, weights)
    ctx.num_players = num_players


def _reduce_gemm_grad(ctx, grad_sums, grad_weight_sums):
    packed, values, weights = ctx.saved_tensors
    need_values, need_weights = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    grad_values, grad_weights = _reduce_gemm_backward(
        grad_sums, grad_weight_sums, packed, values, weights, ctx.num_players, need_values, need_weights
    )
    return None, grad_values if need_values else None, grad_weights if need_weights else None, None


_reduce_gemm.register_autograd(_reduce_gemm_grad, setup_context=_reduce_gemm_setup)


# ------------------------------------------------------------------ fake kernels and autograd (extension)


def _register_fakes() -> None:
    """Output shapes of the extension's ops for tracing; the bit packing's too (shapkern.ops.bitpack):
    csrc/schemas.cpp names this module as the home of all of them."""
    lib = "shapkern::"

    @torch.library.register_fake(lib + "segment_sum")
    def _(values, cu_seqlens):
        return values.new_empty((cu_seqlens.shape[0] - 1, values.shape[1]))

    @torch.library.register_fake(lib + "segment_expand")
    def _(grad, cu_seqlens, num_tokens):
        return grad.new_empty((num_tokens, grad.shape[1]))

    @torch.library.register_fake(lib + "coalition_reduce")
    def _(packed, values, weights, num_players):
        batch, _, k = values.shape
        return values.new_empty((batch, num_players, k)), values.new_empty((batch, num_players))

    @torch.library.register_fake(lib + "pack_masks")
    def _(coalitions):
        shape = (*coalitions.shape[:-1], num_words(coalitions.shape[-1]))
        return coalitions.new_empty(shape, dtype=torch.int32)

    @torch.library.register_fake(lib + "unpack_masks")
    def _(packed, num_players):
        return packed.new_empty((*packed.shape[:-1], num_players), dtype=torch.bool)


def _register() -> None:
    lib = "shapkern::"
    _register_fakes()

    def segment_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])
        ctx.num_tokens = inputs[0].shape[0]

    def segment_sum_backward(ctx, grad):
        (cu_seqlens,) = ctx.saved_tensors
        return torch.ops.shapkern.segment_expand(grad, cu_seqlens, ctx.num_tokens), None

    def segment_expand_backward(ctx, grad):
        (cu_seqlens,) = ctx.saved_tensors
        return torch.ops.shapkern.segment_sum(grad, cu_seqlens), None, None

    def coalition_setup(ctx, inputs, output):
        packed, values, weights, num_players = inputs
        ctx.save_for_backward(packed, values, weights)
        ctx.num_players = num_players

    def coalition_reduce_backward(ctx, grad_sums, grad_weight_sums):
        # d sums / d v[b,m,k] = w[b,m] (Z G)[b,m,k]; d / d w[b,m] = sum_k (Z G)[b,m,k] v[b,m,k] + (Z g)[b,m]
        packed, values, weights = ctx.saved_tensors
        acc = acc_dtype(values.dtype)
        z = torch.ops.shapkern.unpack_masks(packed, ctx.num_players).to(acc)
        w = weights.to(acc).unsqueeze(-1)
        if not ctx.needs_input_grad[2]:
            return None, torch.bmm(z * w, grad_sums.to(acc)).to(values.dtype), None, None
        zg = torch.bmm(z, grad_sums.to(acc))
        # The row dots as a batched GEMM and w applied in place: no (B, M, K) temporaries.
        gw = (
            torch.einsum("bmk,bmk->bm", zg, values.to(acc))
            + (z @ grad_weight_sums.to(acc).unsqueeze(-1))[..., 0]
        )
        grad_values = None
        if ctx.needs_input_grad[1]:
            # In place, unless this backward is recorded (create_graph): the einsum saved zg.
            grad_values = (zg * w if torch.is_grad_enabled() else zg.mul_(w)).to(values.dtype)
        return None, grad_values, gw.to(weights.dtype), None

    torch.library.register_autograd(lib + "segment_sum", segment_sum_backward, setup_context=segment_setup)
    torch.library.register_autograd(
        lib + "segment_expand", segment_expand_backward, setup_context=segment_setup
    )
    torch.library.register_autograd(
        lib + "coalition_reduce", coalition_reduce_backward, setup_context=coalition_setup
    )


if _ext.extension_loaded():
    _register()
