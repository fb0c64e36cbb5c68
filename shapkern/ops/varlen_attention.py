"""Packed variable-length self-attention: autograd op, PyTorch reference and dispatch.

Tokens of R sequences are packed as (T, H, D) tensors; ``cu_seqlens`` (R + 1,) int32 holds the
boundaries (cu_seqlens[0] = 0, cu_seqlens[-1] = T), FlashAttention's varlen convention. Each token
attends to every token of its own sequence (no causal mask, no dropout).
"""

import torch

try:
    from shapkern.kernels.varlen_attention import (
        SUPPORTED_HEAD_DIMS,
        varlen_attention_backward,
        varlen_attention_forward,
    )

    _HAS_TRITON = True
except ImportError:  # no triton: every device takes the reference path
    SUPPORTED_HEAD_DIMS = ()
    _HAS_TRITON = False

__all__ = ["varlen_attention", "varlen_attention_reference"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


CPU_LENGTH_BUCKETS = 4


def _padded_attention(q, k, v, starts, lengths, width: int, scale):
    """Attention over sequences padded to ``width``: starts, lengths (G,) -> (token index, out) of the real tokens."""
    pos = torch.arange(width, device=q.device)
    real = pos < lengths[:, None]  # (G, width)
    index = torch.where(real, starts[:, None] + pos, 0)
    # Empty sequences keep key 0 so that no softmax row is fully masked (NaN); their rows are dropped.
    key_mask = pos < lengths.clamp(min=1)[:, None]
    q, k, v = (x[index].transpose(1, 2) for x in (q, k, v))  # (G, H, width, D)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=key_mask[:, None, None, :], scale=scale
    )
    return index[real], out.transpose(1, 2)[real]


def _paired_rows_attention(q, k, v, first_lengths, width: int, scale):
    """Sequences 2i and 2i+1 filling rows of ``width`` tokens (complementary coalitions): each row is
    dense attention with a block-diagonal mask, read in place, no gather: (T, H, D) -> (T, H, D)."""
    rows = first_lengths.shape[0]
    second = torch.arange(width, device=q.device) >= first_lengths[:, None]  # (rows, width)
    mask = (second[:, :, None] == second[:, None, :]).unsqueeze(1)
    q, k, v = (x.view(rows, width, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(rows * width, *out.shape[1:2], out.shape[-1])


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    *,
    length_buckets: int | None = None,
) -> torch.Tensor:
    """Plain PyTorch varlen attention: pad sequences, masked SDPA, gather back.

    q, k, v: (T, H, D); cu_seqlens: (R + 1,) int; max_seqlen: upper bound on every length.
    length_buckets: sort the sequences by length into this many groups, each padded to its own
    longest (reads the lengths on the host); 0 pads all to ``max_seqlen`` with no host sync.
    Default: CPU_LENGTH_BUCKETS on the CPU, where host reads are free, else 0. With buckets, pairs of
    sequences that fill equal rows (complementary coalitions) run as dense rows with no gather.
    Returns (T, H, D); differentiable; accepts float64.
    """
    if q.shape[0] == 0:  # no tokens: nothing to attend; clone keeps the autograd graph
        return q.clone()
    cu = cu_seqlens.long()
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    if length_buckets is None:
        length_buckets = CPU_LENGTH_BUCKETS if q.device.type == "cpu" else 0
    if length_buckets > 0:
        pairs = lengths.view(-1, 2).sum(-1) if lengths.shape[0] % 2 == 0 else lengths[:0]
        if pairs.numel() and int(pairs[0]) > 0 and bool((pairs == pairs[0]).all()):
            return _paired_rows_attention(q, k, v, lengths[0::2], int(pairs[0]), scale)
        groups = lengths.argsort().tensor_split(length_buckets)
        parts = [(g, int(lengths[g].max())) for g in groups if g.numel()]
    else:
        parts = [(slice(None), max_seqlen)]
    pieces = [_padded_attention(q, k, v, starts[g], lengths[g], max(width, 1), scale) for g, width in parts]
    index = torch.cat([index for index, _ in pieces])
    return q.new_zeros(q.shape).index_put((index,), torch.cat([out for _, out in pieces]))


@torch.library.custom_op("shapkern::varlen_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return varlen_attention_forward(q, k, v, cu_seqlens, max_seqlen, scale)


@_fwd_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale):
    T, H, D = q.shape
    return q.new_empty((T, H, D)), q.new_empty((T, H), dtype=torch.float32)


@torch.library.custom_op("shapkern::varlen_attention_bwd", mutates_args=())
def _bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return varlen_attention_backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale)


@_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


class VarlenAttentionFunction(torch.autograd.Function):
    """Triton varlen attention; forward and backward are custom ops so torch.compile can trace them."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale):
        out, lse = _fwd_op(q, k, v, cu_seqlens, max_seqlen, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen = max_seqlen
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _bwd_op(dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
        return dq, dk, dv, None, None, None


def _check_inputs(q, k, v, cu_seqlens, max_seqlen, triton_path: bool) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(
                f"varlen_attention: {name} must be a (T, H, D) tensor, got {getattr(x, 'shape', x)}"
            )
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"varlen_attention: {name} shape {tuple(x.shape)} != q shape {tuple(q.shape)}")
        if x.dtype != q.dtype:
            raise ValueError(f"varlen_attention: {name} dtype {x.dtype} != q dtype {q.dtype}")
        if x.device != q.device:
            raise ValueError(f"varlen_attention: {name} device {x.device} != q device {q.device}")
    dtypes = _TRITON_DTYPES if triton_path else (*_TRITON_DTYPES, torch.float64)
    if q.dtype not in dtypes:
        raise ValueError(
            f"varlen_attention: q dtype {q.dtype} not supported on {q.device}; use one of {dtypes}"
        )
    if triton_path and q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"varlen_attention: head dim of q must be one of {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}"
        )
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError("varlen_attention: cu_seqlens must be a 1-D tensor of R + 1 sequence boundaries")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"varlen_attention: cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"varlen_attention: cu_seqlens device {cu_seqlens.device} != q device {q.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt)) or max_seqlen < 0:
        raise ValueError(
            f"varlen_attention: max_seqlen must be a non-negative Python int, got {max_seqlen!r}"
        )


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Self-attention within each packed sequence.

    q, k, v: (T, H, D), any strides (e.g. views of a fused qkv); cu_seqlens: (R + 1,) int32 on
    q's device; max_seqlen: a static upper bound on the sequence lengths (lengths may be smaller,
    even 0; it is never checked, to avoid a host sync); scale: defaults to D ** -0.5.
    Returns out (T, H, D). CUDA tensors run the Triton kernels (fp16/bf16/fp32, D in
    SUPPORTED_HEAD_DIMS); other devices run ``varlen_attention_reference`` (also float64).
    """
    triton_path = _HAS_TRITON and isinstance(q, torch.Tensor) and q.is_cuda
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, triton_path)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if triton_path:
        return VarlenAttentionFunction.apply(q, k, v, cu_seqlens, max_seqlen, scale)
    return varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen, scale)
