"""The plain PyTorch reference of :func:`shapkern.ops.varlen_attention`: pad the sequences, run masked
SDPA, gather back (any device, float64 too). On the CPU it lays out the sequences on the host once
per plan: complementary pairs as dense rows with a block-diagonal mask, other sequences in length
buckets (docs/design.md, "Packing layout").

:func:`paired_rows_attention` is that pair layout on any device with no host read (the mask built on
the device from ``cu_seqlens``): the engine's ``attention="pairs"``, SDPA's fused kernels in place of
the varlen kernels where the dispatch table measured them faster.
"""

import torch

__all__ = ["CPU_LENGTH_BUCKETS", "paired_rows_attention", "varlen_attention_reference"]

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


def paired_rows_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float | None = None,
    *,
    bias: torch.Tensor | None = None,
    bias_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over complementary pairs: sequences 2i and 2i+1 (R even) fill rows of W = T / (R/2)
    tokens, each row one dense SDPA call with a block-diagonal mask built on the device (no host
    sync; under torch.compile too). (T, H, D) -> (T, H, D); bias as :func:`varlen_attention_reference`.
    Expects a valid pair plan (:func:`~shapkern.ops.varlen_attention` with ``pairs=True`` checks it)."""
    rows = (cu_seqlens.shape[0] - 1) // 2
    if q.shape[0] == 0 or rows == 0:
        return q.clone()
    width = q.shape[0] // rows
    first_lengths = cu_seqlens[1::2] - cu_seqlens[0:-1:2]  # (rows,) tokens of sequence 2i
    second = torch.arange(width, device=q.device) >= first_lengths[:, None]  # (rows, W)
    same = (second[:, :, None] == second[:, None, :]).unsqueeze(1)
    mask = torch.zeros(same.shape, dtype=q.dtype, device=q.device).masked_fill(~same, float("-inf"))
    if bias is not None and bias_index is not None:
        mask = mask + _gathered_bias(bias, bias_index.view(rows, width), q.dtype)
    return _paired_rows_attention(q, k, v, first_lengths, width, mask, scale)


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
            if bias is not None and bias_index is not None:  # given together (varlen_attention checks)
                positions = bias_index.view(-1, layout.width)
                mask = mask + _gathered_bias(bias, positions, q.dtype)
            return _paired_rows_attention(q, k, v, layout.first_lengths, layout.width, mask, scale)
        starts, lengths = layout.starts, layout.lengths
        parts: list[tuple[torch.Tensor | slice, int]] = list(layout.parts)
    else:
        cu = cu_seqlens.long()
        starts, lengths, parts = cu[:-1], cu[1:] - cu[:-1], [(slice(None), max_seqlen)]
    pieces = [
        _padded_attention(q, k, v, starts[g], lengths[g], max(width, 1), scale, bias, bias_index)
        for g, width in parts
    ]
    index = torch.cat([index for index, _ in pieces])
    return q.new_zeros(q.shape).index_put((index,), torch.cat([out for _, out in pieces]))
