"""Packed variable-length self-attention: autograd op, PyTorch reference and dispatch.

Tokens of R sequences are packed as (T, H, D) tensors; ``cu_seqlens`` (R + 1,) int32 holds the
boundaries (cu_seqlens[0] = 0, non-decreasing, cu_seqlens[-1] = T), FlashAttention's varlen
convention. Each token attends to every token of its own sequence (no causal mask, no dropout).
An optional additive bias per (head, query position, key position), looked up through each token's
position in the model's full sequence, carries BEiT's relative position bias.

The Triton path is the custom op ``shapkern::varlen_attention_fwd`` (returns out and the log-sum-exp)
with its autograd registered through ``torch.library.register_autograd``, whose backward is the
custom op ``shapkern::varlen_attention_bwd``; both have fake kernels, so ``torch.compile`` traces
forward and backward with ``fullgraph=True``.
"""

from typing import NoReturn, Protocol

import torch

try:
    from shapkern.kernels.varlen_attention import (
        SUPPORTED_HEAD_DIMS,
        varlen_attention_backward,
        varlen_attention_forward,
    )

    _HAS_TRITON = True
except ImportError:  # no triton: every device takes the reference path
    SUPPORTED_HEAD_DIMS = ()  # type: ignore[assignment]  # the kernels' tuple when triton imports
    _HAS_TRITON = False

__all__ = ["AttentionFn", "varlen_attention", "varlen_attention_reference"]

from shapkern.ops.varlen_attention_reference import paired_rows_attention, varlen_attention_reference

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class AttentionFn(Protocol):
    """Attention within each packed sequence, as the engine calls it (see :func:`varlen_attention`).

    q, k, v: (T, H, D); cu_seqlens: (R + 1,) int32 on q's device; max_seqlen: a static upper bound on
    the sequence lengths; scale: None for D ** -0.5; bias, bias_index: an additive score bias (H, L, L)
    at each token's position (T,) in the model's full sequence, or None (only families with a
    position-dependent bias pass them). Returns out (T, H, D) in q's dtype.
    """

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        scale: float | None = None,
        *,
        bias: torch.Tensor | None = None,
        bias_index: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


# ------------------------------------------------------------------------------- custom ops, autograd


@torch.library.custom_op("shapkern::varlen_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    bias: torch.Tensor | None = None,
    bias_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: out (T, H, D) and the natural log-sum-exp (T, H) fp32 the backward needs."""
    return varlen_attention_forward(q, k, v, cu_seqlens, max_seqlen, scale, bias, bias_index)


@_fwd_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, bias=None, bias_index=None):
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
    bias: torch.Tensor | None = None,
    bias_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: dq, dk, dv (T, H, D) contiguous, and d bias in the bias's shape and dtype
    (an empty tensor without a bias: a custom op returns no None)."""
    dq, dk, dv, dbias = varlen_attention_backward(
        dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, bias, bias_index
    )
    if bias is None or dbias is None:
        return dq, dk, dv, q.new_empty(0)
    return dq, dk, dv, dbias.to(bias.dtype)


@_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, bias=None, bias_index=None):
    dbias = q.new_empty(0) if bias is None else bias.new_empty(bias.shape)
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), dbias


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, max_seqlen, scale, bias, bias_index = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, bias, bias_index)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens, bias, bias_index = ctx.saved_tensors
    dq, dk, dv, dbias = _bwd_op(
        dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale, bias, bias_index
    )
    return dq, dk, dv, None, None, None, None if bias is None else dbias, None


torch.library.register_autograd("shapkern::varlen_attention_fwd", _backward, setup_context=_setup_context)


def _use_triton(q: torch.Tensor) -> bool:
    """Whether q's device runs the Triton kernels (CUDA) rather than the reference."""
    return _HAS_TRITON and q.is_cuda


# -------------------------------------------------------------------------------------------- checks


def _fail(message: str) -> NoReturn:
    raise ValueError(f"varlen_attention: {message}")


def _check_inputs(q, k, v, cu_seqlens, max_seqlen, triton_path: bool) -> None:
    """Types, shapes, dtypes and devices: metadata only, no host sync."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            _fail(f"{name} must be a (T, H, D) tensor, got {getattr(x, 'shape', x)}")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            _fail(f"{name} shape {tuple(x.shape)} != q shape {tuple(q.shape)}")
        if x.dtype != q.dtype:
            _fail(f"{name} dtype {x.dtype} != q dtype {q.dtype}")
        if x.device != q.device:
            _fail(f"{name} device {x.device} != q device {q.device}")
    if q.shape[1] < 1 or q.shape[2] < 1:
        _fail(f"q must have at least one head and a head dim >= 1, got (T, H, D) = {tuple(q.shape)}")
    dtypes = _TRITON_DTYPES if triton_path else (*_TRITON_DTYPES, torch.float64)
    if q.dtype not in dtypes:
        _fail(f"q dtype {q.dtype} not supported on {q.device}; use one of {dtypes}")
    if triton_path and q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        _fail(f"head dim of q must be one of {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        got = getattr(cu_seqlens, "shape", cu_seqlens)
        _fail(f"cu_seqlens must be a 1-D tensor of R + 1 sequence boundaries, got {got}")
    if cu_seqlens.dtype != torch.int32:
        _fail(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.device != q.device:
        _fail(f"cu_seqlens device {cu_seqlens.device} != q device {q.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt)) or max_seqlen < 0:
        _fail(f"max_seqlen must be a non-negative Python int, got {max_seqlen!r}")


def _check_bias(bias, bias_index, q: torch.Tensor, triton_path: bool) -> None:
    """The bias and its index, like :func:`_check_inputs`: metadata only, no host sync."""
    if (bias is None) != (bias_index is None):
        _fail("bias and bias_index go together: pass both or neither")
    if bias is None:
        return
    heads = q.shape[1]
    if not isinstance(bias, torch.Tensor) or bias.dim() != 3 or bias.shape[0] != heads:
        _fail(f"bias must be a (H, L, L) = ({heads}, L, L) tensor, got {getattr(bias, 'shape', bias)}")
    if bias.shape[1] != bias.shape[2] or bias.shape[1] < 1:
        _fail(f"bias must be square over L >= 1 positions, (H, L, L), got {tuple(bias.shape)}")
    if bias.shape[1] ** 2 >= 2**31:
        _fail(f"bias holds L = {bias.shape[1]} positions; L * L must be below 2**31")
    dtypes = _TRITON_DTYPES if triton_path else (*_TRITON_DTYPES, torch.float64)
    if bias.dtype not in dtypes:
        _fail(f"bias dtype {bias.dtype} not supported on {q.device}; use one of {dtypes}")
    if bias.device != q.device:
        _fail(f"bias device {bias.device} != q device {q.device}")
    tokens = q.shape[0]
    if not isinstance(bias_index, torch.Tensor) or bias_index.shape != (tokens,):
        _fail(
            f"bias_index must be a (T,) = ({tokens},) tensor, got {getattr(bias_index, 'shape', bias_index)}"
        )
    if bias_index.dtype not in (torch.int32, torch.int64):
        _fail(f"bias_index must be int32 or int64, got {bias_index.dtype}")
    if bias_index.device != q.device:
        _fail(f"bias_index device {bias_index.device} != q device {q.device}")


def _check_pair_shape(cu_seqlens: torch.Tensor, num_tokens: int) -> int:
    """The row width W = T / (R/2) of ``pairs=True``, from metadata (no sync): R even, T a multiple."""
    rows = cu_seqlens.shape[0] - 1
    if rows % 2 or (rows and num_tokens % (rows // 2)):
        _fail(
            f"pairs=True needs an even number of sequences R filling equal rows (T a multiple of R/2), "
            f"got R = {rows}, T = {num_tokens}"
        )
    return num_tokens // (rows // 2) if rows else 0


def _check_plan(
    cu_seqlens: torch.Tensor,
    num_tokens: int,
    max_seqlen: int,
    bias_index: torch.Tensor | None = None,
    positions: int = 0,
    pair_width: int = 0,
) -> None:
    """The values of cu_seqlens, of bias_index (each in [0, positions)) and, with ``pair_width``, that
    sequences 2i and 2i+1 fill rows of that many tokens: one boolean reduced on the device and read
    once (one host sync); the values themselves are read only to word the error."""
    lengths = cu_seqlens.diff()
    valid = (
        (cu_seqlens[0] == 0)
        & (cu_seqlens[-1] == num_tokens)
        & ((lengths >= 0) & (lengths <= max_seqlen)).all()
    )
    if bias_index is not None:
        valid &= ((bias_index >= 0) & (bias_index < positions)).all()
    if pair_width:
        valid &= (cu_seqlens[2::2] - cu_seqlens[0:-2:2] == pair_width).all()
    if bool(valid):
        return
    values = cu_seqlens.tolist()
    sizes = [end - start for start, end in zip(values[:-1], values[1:], strict=True)]
    if values[0] != 0:
        _fail(f"cu_seqlens[0] must be 0, got {values[0]}")
    if values[-1] != num_tokens:
        _fail(
            f"cu_seqlens[-1] must equal the number of tokens T = q.shape[0] = {num_tokens}, got {values[-1]}"
        )
    for i, length in enumerate(sizes):
        if length < 0:
            _fail(
                f"cu_seqlens must be non-decreasing, got cu_seqlens[{i + 1}] = {values[i + 1]} < "
                f"cu_seqlens[{i}] = {values[i]}"
            )
    longest = max(range(len(sizes)), key=sizes.__getitem__, default=0)
    if sizes and sizes[longest] > max_seqlen:
        _fail(
            f"max_seqlen = {max_seqlen} is less than the longest sequence: sequence {longest} holds "
            f"{sizes[longest]} tokens"
        )
    if pair_width:
        rows = [a + b for a, b in zip(sizes[0::2], sizes[1::2], strict=True)]
        bad = next((i for i, row in enumerate(rows) if row != pair_width), None)
        if bad is not None:
            _fail(
                f"pairs=True: sequences {2 * bad} and {2 * bad + 1} hold {rows[bad]} tokens together, but "
                f"every pair must fill a row of T / (R/2) = {pair_width} (complementary coalitions)"
            )
    assert bias_index is not None  # the plan is valid: the bias positions are what failed
    token = int(((bias_index < 0) | (bias_index >= positions)).nonzero()[0, 0])
    _fail(
        f"bias_index must hold positions in [0, L) = [0, {positions}) of the bias (H, L, L), got "
        f"bias_index[{token}] = {int(bias_index[token])}"
    )


# ---------------------------------------------------------------------------------------------- op


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    *,
    bias: torch.Tensor | None = None,
    bias_index: torch.Tensor | None = None,
    validate: bool = True,
    pairs: bool = False,
) -> torch.Tensor:
    """Self-attention within each packed sequence, with an optional additive bias of the scores.

    q, k, v: (T, H, D), any strides (e.g. views of a fused qkv); cu_seqlens: (R + 1,) int32 on
    q's device, cu_seqlens[0] = 0, non-decreasing, cu_seqlens[-1] = T; max_seqlen: a static upper
    bound on the sequence lengths (lengths may be smaller, even 0); it also picks the kernels'
    schedule, so pass the tightest static bound (P + N for coalition plans); scale: defaults to
    D ** -0.5.
    bias, bias_index: None, or bias (H, L, L) float (any float dtype; fp32 math in the kernels) and
    bias_index (T,) int32/int64, the position in [0, L) of every token in the model's full sequence
    (prefix tokens then patches, say): the score of query t and key s of one sequence gains
    bias[h, bias_index[t], bias_index[s]]. Gradients flow to q, k, v and the bias; on CUDA the bias
    gradient is summed with atomic adds (run-to-run differences at fp32 rounding; dq, dk, dv and the
    CPU reference are deterministic).
    validate: check the values of cu_seqlens and max_seqlen, and that bias_index lies in [0, L) (a
    ValueError naming what is wrong), at the cost of one host sync; skipped under torch.compile
    tracing. Pass False for plans valid by construction (the engine's); a wrong plan then gives
    wrong results or, on CUDA, out-of-bounds reads.
    pairs: sequences 2i and 2i+1 fill rows of equal width W = T / (R/2) (the layout of complementary
    coalitions): run each row as one dense SDPA call with a block-diagonal mask, on every device
    (:func:`~shapkern.ops.varlen_attention_reference.paired_rows_attention`; no Triton), where the
    engine's dispatch table measured SDPA faster. R must be even and T a multiple of R/2; validate
    also checks that every pair fills its row.
    Types, shapes, dtypes and devices are always checked (no sync).
    Returns out (T, H, D). CUDA tensors run the Triton kernels (fp16/bf16/fp32, D in
    SUPPORTED_HEAD_DIMS); other devices run ``varlen_attention_reference`` (also float64).
    """
    triton_path = isinstance(q, torch.Tensor) and _use_triton(q) and not pairs
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, triton_path)
    _check_bias(bias, bias_index, q, triton_path)
    width = _check_pair_shape(cu_seqlens, q.shape[0]) if pairs else 0
    if validate and not torch.compiler.is_compiling():
        positions = 0 if bias is None else bias.shape[-1]
        _check_plan(cu_seqlens, q.shape[0], max_seqlen, bias_index, positions, width)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if pairs:
        return paired_rows_attention(q, k, v, cu_seqlens, scale, bias=bias, bias_index=bias_index)
    if triton_path:
        if bias_index is not None:  # the kernels address the bias with 32-bit offsets
            bias_index = bias_index.to(torch.int32)
        return _fwd_op(q, k, v, cu_seqlens, max_seqlen, scale, bias, bias_index)[0]
    return varlen_attention_reference(
        q, k, v, cu_seqlens, max_seqlen, scale, bias=bias, bias_index=bias_index
    )
