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


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain PyTorch varlen attention: pad to (R, max_seqlen, H, D), masked SDPA, gather back.

    q, k, v: (T, H, D); cu_seqlens: (R + 1,) int; max_seqlen: upper bound on every length.
    Returns (T, H, D). Vectorised, no host sync; differentiable; accepts float64.
    """
    T, H, D = q.shape
    num_seqs = cu_seqlens.numel() - 1
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    seq_id = torch.repeat_interleave(torch.arange(num_seqs, device=q.device), lengths, output_size=T)
    pos = torch.arange(T, device=q.device) - cu[seq_id]

    def pad(x: torch.Tensor) -> torch.Tensor:  # (T, H, D) -> (R, H, max_seqlen, D)
        padded = x.new_zeros(num_seqs, max_seqlen, H, D).index_put((seq_id, pos), x)
        return padded.transpose(1, 2)

    # Empty sequences keep key 0 (a zero pad) so that no softmax row is fully masked (NaN).
    key_mask = torch.arange(max_seqlen, device=q.device) < lengths.clamp(min=1)[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        pad(q), pad(k), pad(v), attn_mask=key_mask[:, None, None, :], scale=scale
    )
    return out.transpose(1, 2)[seq_id, pos]


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
