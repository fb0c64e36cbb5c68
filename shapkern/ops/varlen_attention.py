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
    SUPPORTED_HEAD_DIMS = ()
    _HAS_TRITON = False

__all__ = ["AttentionFn", "varlen_attention", "varlen_attention_reference"]

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


# ------------------------------------------------------------------------------------------ reference

CPU_LENGTH_BUCKETS = 4


def _gathered_bias(bias: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bias (H, L, L) between the tokens of G rows at ``positions`` (G, W): (G, H, W, W) in dtype."""
    heads, length = bias.shape[0], bias.shape[-1]
    pairs = positions[:, :, None] * length + positions[:, None, :]  # (G, W, W)
    # index_select, not indexing: its backward (index_add) sums in a fixed order on the CPU.
    picked = torch.index_select(bias.reshape(heads, -1), 1, pairs.reshape(-1))
    return picked.view(heads, *pairs.shape).transpose(0, 1).to(dtype)


def _padded_attention(q, k, v, starts, lengths, width: int, scale, bias=None, bias_index=None):
    """Attention over sequences padded to ``width``: starts, lengths (G,) -> (token index, out) of the
    real tokens."""
    pos = torch.arange(width, device=q.device)
    real = pos < lengths[:, None]  # (G, width)
    index = torch.where(real, starts[:, None] + pos, 0)
    # Empty sequences keep key 0 so that no softmax row is fully masked (NaN); their rows are dropped.
    mask = (pos < lengths.clamp(min=1)[:, None])[:, None, None, :]
    if bias is not None:
        mask = _gathered_bias(bias, bias_index[index], q.dtype).masked_fill(~mask, float("-inf"))
    q, k, v = (x[index].transpose(1, 2) for x in (q, k, v))  # (G, H, width, D)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return index[real], out.transpose(1, 2)[real]


def _paired_rows_attention(q, k, v, first_lengths, width: int, mask: torch.Tensor, scale):
    """Sequences 2i and 2i+1 filling rows of ``width`` tokens (complementary coalitions): each row is
    dense attention with the block-diagonal additive ``mask`` (rows, 1 or H, width, width), read in
    place, no gather: (T, H, D) -> (T, H, D)."""
    rows = first_lengths.shape[0]
    q, k, v = (x.view(rows, width, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(rows * width, *out.shape[1:2], out.shape[-1])


class _HostLayout:
    """How the CPU reference lays out the sequences of one ``cu_seqlens``, read on the host once.

    Every block of a forward (and its backward) passes the same plan, so the layout of the last
    plan is kept (see :func:`_host_layout`): no mask building after the first block.
    """

    def __init__(self, cu_seqlens: torch.Tensor, length_buckets: int):
        cu = cu_seqlens.long()
        self.cu_seqlens = cu_seqlens.clone()  # the content this layout was built from (the cache key)
        self.length_buckets = length_buckets
        self.inference = torch.is_inference_mode_enabled()
        self.starts, self.lengths = cu[:-1], cu[1:] - cu[:-1]
        lengths = self.lengths
        pairs = lengths.view(-1, 2).sum(-1) if lengths.shape[0] % 2 == 0 else lengths[:0]
        self.width = 0
        self.masks: dict[torch.dtype, torch.Tensor] = {}
        if pairs.numel() and int(pairs[0]) > 0 and bool((pairs == pairs[0]).all()):
            self.width = int(pairs[0])
            self.first_lengths = lengths[0::2]
            second = (
                torch.arange(self.width, device=cu.device) >= self.first_lengths[:, None]
            )  # (rows, width)
            self.same_sequence = (second[:, :, None] == second[:, None, :]).unsqueeze(1)
        else:
            groups = lengths.argsort(stable=True).tensor_split(
                length_buckets
            )  # stable: fixed groups, same sums
            self.parts = [(g, int(lengths[g].max())) for g in groups if g.numel()]

    def describes(self, cu_seqlens: torch.Tensor, length_buckets: int) -> bool:
        """Whether this layout is the one of ``cu_seqlens`` (compared by content, so an in-place
        edit of the tensor is seen) in the current inference mode (tensors made under
        ``torch.inference_mode`` must not reach autograd outside it)."""
        return (
            self.length_buckets == length_buckets
            and self.inference == torch.is_inference_mode_enabled()
            and self.cu_seqlens.shape == cu_seqlens.shape
            and self.cu_seqlens.device == cu_seqlens.device
            and torch.equal(self.cu_seqlens, cu_seqlens)
        )

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The pair rows' mask as 0 / -inf in ``dtype`` (SDPA converts a bool mask on every call)."""
        if dtype not in self.masks:
            mask = torch.zeros(self.same_sequence.shape, dtype=dtype, device=self.same_sequence.device)
            self.masks[dtype] = mask.masked_fill_(~self.same_sequence, float("-inf"))
        return self.masks[dtype]


_last_layout: _HostLayout | None = None


def _host_layout(cu_seqlens: torch.Tensor, length_buckets: int) -> _HostLayout:
    """The layout of ``cu_seqlens``: the last one built when it describes the same content (an
    O(R) comparison on the host, against the mask building it saves in every block)."""
    global _last_layout
    if torch.compiler.is_compiling():  # traced code must not capture another plan's layout
        return _HostLayout(cu_seqlens, length_buckets)
    if _last_layout is None or not _last_layout.describes(cu_seqlens, length_buckets):
        _last_layout = _HostLayout(cu_seqlens, length_buckets)
    return _last_layout


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    *,
    bias: torch.Tensor | None = None,
    bias_index: torch.Tensor | None = None,
    length_buckets: int | None = None,
) -> torch.Tensor:
    """Plain PyTorch varlen attention: pad sequences, masked SDPA, gather back.

    q, k, v: (T, H, D); cu_seqlens: (R + 1,) int; max_seqlen: upper bound on every length.
    bias, bias_index: None, or a bias (H, L, L) (any float dtype, cast to q's) added to the scaled
    score of every (query, key) pair at their positions bias_index (T,) int in [0, L); differentiable
    in the bias too (deterministic on the CPU).
    length_buckets: sort the sequences by length into this many groups, each padded to its own
    longest (reads the lengths on the host, once per plan, compared by content); 0 pads all to
    ``max_seqlen`` with no host sync. Default: CPU_LENGTH_BUCKETS on the CPU, where host reads are
    free, else 0. With buckets, pairs of sequences that fill equal rows (complementary coalitions)
    run as dense rows with no gather. Returns (T, H, D); differentiable; accepts float64. Expects a
    valid plan (see :func:`varlen_attention`, which checks it).
    """
    if q.shape[0] == 0:  # no tokens: nothing to attend; clone keeps the autograd graph
        return q.clone()
    if length_buckets is None:
        length_buckets = CPU_LENGTH_BUCKETS if q.device.type == "cpu" else 0
    if length_buckets > 0:
        layout = _host_layout(cu_seqlens, length_buckets)
        if layout.width:
            mask = layout.additive_mask(q.dtype)
            if bias is not None:
                positions = bias_index.view(-1, layout.width)
                mask = mask + _gathered_bias(bias, positions, q.dtype)
            return _paired_rows_attention(q, k, v, layout.first_lengths, layout.width, mask, scale)
        starts, lengths, parts = layout.starts, layout.lengths, layout.parts
    else:
        cu = cu_seqlens.long()
        starts, lengths, parts = cu[:-1], cu[1:] - cu[:-1], [(slice(None), max_seqlen)]
    pieces = [
        _padded_attention(q, k, v, starts[g], lengths[g], max(width, 1), scale, bias, bias_index)
        for g, width in parts
    ]
    index = torch.cat([index for index, _ in pieces])
    return q.new_zeros(q.shape).index_put((index,), torch.cat([out for _, out in pieces]))


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
    *grads, dbias = varlen_attention_backward(
        dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, bias, bias_index
    )
    return *grads, q.new_empty(0) if bias is None else dbias.to(bias.dtype)


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


def _check_plan(
    cu_seqlens: torch.Tensor,
    num_tokens: int,
    max_seqlen: int,
    bias_index: torch.Tensor | None = None,
    positions: int = 0,
) -> None:
    """The values of cu_seqlens and of bias_index (each in [0, positions)): one boolean reduced on the
    device and read once (one host sync); the values themselves are read only to word the error."""
    lengths = cu_seqlens.diff()
    valid = (
        (cu_seqlens[0] == 0)
        & (cu_seqlens[-1] == num_tokens)
        & ((lengths >= 0) & (lengths <= max_seqlen)).all()
    )
    if bias_index is not None:
        valid &= ((bias_index >= 0) & (bias_index < positions)).all()
    if bool(valid):
        return
    values = cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(values[:-1], values[1:], strict=True)]
    if values[0] != 0:
        _fail(f"cu_seqlens[0] must be 0, got {values[0]}")
    if values[-1] != num_tokens:
        _fail(
            f"cu_seqlens[-1] must equal the number of tokens T = q.shape[0] = {num_tokens}, got {values[-1]}"
        )
    for i, length in enumerate(lengths):
        if length < 0:
            _fail(
                f"cu_seqlens must be non-decreasing, got cu_seqlens[{i + 1}] = {values[i + 1]} < "
                f"cu_seqlens[{i}] = {values[i]}"
            )
    longest = max(range(len(lengths)), key=lengths.__getitem__, default=0)
    if lengths and lengths[longest] > max_seqlen:
        _fail(
            f"max_seqlen = {max_seqlen} is less than the longest sequence: sequence {longest} holds "
            f"{lengths[longest]} tokens"
        )
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
    Types, shapes, dtypes and devices are always checked (no sync).
    Returns out (T, H, D). CUDA tensors run the Triton kernels (fp16/bf16/fp32, D in
    SUPPORTED_HEAD_DIMS); other devices run ``varlen_attention_reference`` (also float64).
    """
    triton_path = isinstance(q, torch.Tensor) and _use_triton(q)
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, triton_path)
    _check_bias(bias, bias_index, q, triton_path)
    if validate and not torch.compiler.is_compiling():
        positions = 0 if bias is None else bias.shape[-1]
        _check_plan(cu_seqlens, q.shape[0], max_seqlen, bias_index, positions)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if triton_path:
        if bias_index is not None:  # the kernels address the bias with 32-bit offsets
            bias_index = bias_index.to(torch.int32)
        return _fwd_op(q, k, v, cu_seqlens, max_seqlen, scale, bias, bias_index)[0]
    return varlen_attention_reference(
        q, k, v, cu_seqlens, max_seqlen, scale, bias=bias, bias_index=bias_index
    )
