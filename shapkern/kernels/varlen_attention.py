"""Triton kernels for packed variable-length self-attention (FlashAttention-2 style).

Layout (FlashAttention varlen convention): q, k, v are (T, H, D) with the tokens of all sequences
packed along T; ``cu_seqlens`` (R + 1,) int32 holds the sequence boundaries. Sequences sit on the
grid's first axis (limit 2**31 - 1, not 65535); ``max_seqlen`` is only an upper bound, so programs
past their sequence's end do nothing. No causal mask, no dropout, no N x N matrix in memory, no
atomics for out, dq, dk, dv: every program writes only its own rows, so they are deterministic.

An optional additive score bias (BEiT's relative position bias) is a (H, L, L) matrix over the
positions of the model's full sequence, with ``bias_index`` (T,) int32 the position of every packed
token: score(t, s) += bias[h, bias_index[t], bias_index[s]] for t, s in one sequence. The kernels
load each bias tile through the index vectors of their query and key blocks (``HAS_BIAS``, a
constexpr: without a bias the kernels compile to the instructions they had before the feature). Its
gradient sums every sequence's score gradients into one fp32 (H, L, L) buffer with atomic adds,
whose order varies from run to run: d bias is deterministic only up to fp32 rounding.

Two schedules, picked from the static ``max_seqlen`` alone (no host sync):

- long: the forward runs one query block per program, grid (R, cdiv(max_seqlen, BLOCK_M), H); the
  backward runs three kernels: delta = rowsum(dO * O), dK/dV per key block (looping over query
  blocks) and dQ per query block (looping over key blocks), so every score tile is computed twice.
- short (``max_seqlen <= SHORT_MAX_SEQLEN["fwd" or "bwd"]``): a program owns ``SEQS_PER_PROGRAM``
  whole consecutive sequences at one head, grid (cdiv(R, SEQS_PER_PROGRAM), H). The forward loops
  over their query blocks; the backward is one kernel that computes each score tile once for dK, dV
  and dQ (5 GEMMs instead of 7), with delta and the dQ partial sums in rows the program owns.
  Complementary coalitions are consecutive and hold 2P + N tokens together, so pairs give every
  program the same work.

The softmax is computed in base 2 (``exp2``) with the scale folded into ``qk_scale = scale * log2(e)``;
the saved log-sum-exp is in natural log units, (T, H) fp32 (1.4426950408889634 = log2(e) and
0.6931471805599453 = ln(2) convert inside the kernels). cu_seqlens[-1] must equal T: tokens outside
every sequence are not written.
"""

import math
import os

import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)
SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 128)
# Largest max_seqlen that takes the short schedule, per direction (ViT-B/16 at 224 px: 197).
# Benchmarks set an entry to 0 to time the long schedule on the same inputs.
SHORT_MAX_SEQLEN = {"fwd": 256, "bwd": 256}
# Whole sequences per program in the short schedule: 2 = a complementary pair.
SEQS_PER_PROGRAM = 2
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _sequence(CU_SEQLENS, seq, num_seqs):
    """(start, length) of sequence ``seq``; past the last sequence, an empty one."""
    seq = tl.minimum(seq, num_seqs)
    start = tl.load(CU_SEQLENS + seq)
    return start, tl.load(CU_SEQLENS + tl.minimum(seq + 1, num_seqs)) - start


@triton.jit
def _bias_tile(BIAS, pairs, mask):
    """One head's bias at the offsets ``pairs`` (query position * L + key position) in base-2 units
    (times log2(e)), fp32, 0 where masked."""
    return tl.load(BIAS + pairs, mask=mask, other=0.0).to(tl.float32) * 1.4426950408889634


@triton.jit
def _fwd_block(
    Q, K, V, O, LSE, BIAS, BIAS_INDEX, row0, start_m, seqlen,
    stride_qt, stride_kt, stride_vt, stride_ot, stride_bl, H, qk_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Queries start_m ... start_m + BLOCK_M - 1 of one sequence and head (pointers at its first token,
    row0 in the packed layout; BIAS at the head's (L, L) matrix with row stride stride_bl)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask_m = offs_m < seqlen
    q_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
    if HAS_BIAS:
        pos_m = tl.load(BIAS_INDEX + row0 + offs_m, mask=mask_m, other=0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, seqlen, BLOCK_N):
        rows_n = start_n + offs_n
        mask_n = rows_n < seqlen
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + rows_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + rows_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            pos_n = tl.load(BIAS_INDEX + row0 + rows_n, mask=mask_n, other=0)
            pairs = pos_m[:, None] * stride_bl + pos_n[None, :]
            qk += _bias_tile(BIAS, pairs, mask_m[:, None] & mask_n[None, :])
        # Every block holds at least one valid key, so m_ij stays finite.
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_ij[:, None])
        alpha = tl.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_ij

    acc = acc / l_i[:, None]
    tl.store(O + offs_m[:, None] * stride_ot + offs_d[None, :], acc.to(O.dtype.element_ty), mask=q_mask)
    tl.store(LSE + offs_m * H, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=mask_m)


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, CU_SEQLENS, BIAS, BIAS_INDEX,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_bh, stride_bl, num_seqs, H, qk_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Long schedule: program (r, m, h) runs query block m of sequence r at head h."""
    seq = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    head = tl.program_id(2)
    start, seqlen = _sequence(CU_SEQLENS, seq, num_seqs)
    if HAS_BIAS:
        BIAS += head.to(tl.int64) * stride_bh
    if start_m < seqlen:
        # 64-bit scalar base per (sequence, head): T * stride can pass 2**31; in-sequence offsets stay 32-bit.
        row0 = start.to(tl.int64)
        _fwd_block(
            Q + row0 * stride_qt + head * stride_qh, K + row0 * stride_kt + head * stride_kh,
            V + row0 * stride_vt + head * stride_vh, O + row0 * stride_ot + head * stride_oh,
            LSE + row0 * H + head, BIAS, BIAS_INDEX, row0, start_m, seqlen,
            stride_qt, stride_kt, stride_vt, stride_ot, stride_bl, H, qk_scale,
            D, BLOCK_D, BLOCK_M, BLOCK_N, HAS_BIAS, PRECISION,
        )  # fmt: skip


@triton.jit
def _fwd_short_kernel(
    Q, K, V, O, LSE, CU_SEQLENS, BIAS, BIAS_INDEX,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_bh, stride_bl, num_seqs, H, qk_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SEQS: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Short schedule: program (g, h) runs every query block of sequences g * SEQS ... g * SEQS + SEQS - 1
    at head h."""
    head = tl.program_id(1)
    if HAS_BIAS:
        BIAS += head.to(tl.int64) * stride_bh
    for s in range(SEQS):
        start, seqlen = _sequence(CU_SEQLENS, tl.program_id(0) * SEQS + s, num_seqs)
        row0 = start.to(tl.int64)
        for start_m in range(0, seqlen, BLOCK_M):
            _fwd_block(
                Q + row0 * stride_qt + head * stride_qh, K + row0 * stride_kt + head * stride_kh,
                V + row0 * stride_vt + head * stride_vh, O + row0 * stride_ot + head * stride_oh,
                LSE + row0 * H + head, BIAS, BIAS_INDEX, row0, start_m, seqlen,
                stride_qt, stride_kt, stride_vt, stride_ot, stride_bl, H, qk_scale,
                D, BLOCK_D, BLOCK_M, BLOCK_N, HAS_BIAS, PRECISION,
            )  # fmt: skip


@triton.jit
def _rows_delta(O, DO, rows, mask_rows, stride_ot, stride_dot, offs_d, mask_d):
    """delta = sum_d dO * O over the given rows (of one head): (BLOCK,) fp32."""
    mask = mask_rows[:, None] & mask_d[None, :]
    o = tl.load(O + rows[:, None] * stride_ot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dot + offs_d[None, :], mask=mask, other=0.0)
    return tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DELTA, T, H,
    stride_ot, stride_oh, stride_dot, stride_doh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """delta[t, h] = sum_d dO[t, h, d] * O[t, h, d], over all T tokens (no sequence structure needed)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    O, DO = O + head * stride_oh, DO + head * stride_doh
    delta = _rows_delta(O, DO, rows, rows < T, stride_ot, stride_dot, offs_d, offs_d < D)
    tl.store(DELTA + rows * H + head, delta, mask=rows < T)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_SEQLENS, BIAS, BIAS_INDEX, DBIAS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_bh, stride_bl,
    H, scale, qk_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One block of BLOCK_N keys; loops over the sequence's query blocks (transposed formulation). With a
    bias, adds each score tile's gradient into DBIAS (fp32, BIAS's strides)."""
    seq = tl.program_id(0)
    pid_n = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(CU_SEQLENS + seq)
    seqlen = tl.load(CU_SEQLENS + seq + 1) - start
    if pid_n * BLOCK_N >= seqlen:
        return

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask_n = offs_n < seqlen
    row0 = start.to(tl.int64)
    Q += row0 * stride_qt + head * stride_qh
    K += row0 * stride_kt + head * stride_kh
    V += row0 * stride_vt + head * stride_vh
    DO += row0 * stride_dot + head * stride_doh
    DK += row0 * stride_dkt + head * stride_dkh
    DV += row0 * stride_dvt + head * stride_dvh
    LSE += row0 * H + head
    DELTA += row0 * H + head
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    if HAS_BIAS:
        BIAS += head.to(tl.int64) * stride_bh
        DBIAS += head.to(tl.int64) * stride_bh
        pos_n = tl.load(BIAS_INDEX + row0 + offs_n, mask=mask_n, other=0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, seqlen, BLOCK_M):
        rows_m = start_m + offs_m
        mask_m = rows_m < seqlen
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(Q + rows_m[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + rows_m[:, None] * stride_dot + offs_d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(LSE + rows_m * H, mask=mask_m, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + rows_m * H, mask=mask_m, other=0.0)
        qkT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        if HAS_BIAS:
            pos_m = tl.load(BIAS_INDEX + row0 + rows_m, mask=mask_m, other=0)
            pairs = pos_m[None, :] * stride_bl + pos_n[:, None]  # transposed: (BLOCK_N, BLOCK_M)
            pair_mask = mask_n[:, None] & mask_m[None, :]
            qkT += _bias_tile(BIAS, pairs, pair_mask)
        # Keys past the end (k = 0) would give exp2(-lse), which overflows when all real scores are very
        # negative. Queries past the end need no mask: they load q = dO = 0 and add nothing to dK, dV.
        pT = tl.exp2(tl.where(mask_n[:, None], qkT - lse[None, :], float("-inf")))
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        if HAS_BIAS:  # d score = d bias
            tl.atomic_add(DBIAS + pairs, dsT, mask=pair_mask)
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=PRECISION)

    tl.store(
        DK + offs_n[:, None] * stride_dkt + offs_d[None, :],
        (dk * scale).to(DK.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(DV + offs_n[:, None] * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS, BIAS, BIAS_INDEX,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_bh, stride_bl,
    H, scale, qk_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One block of BLOCK_M queries; loops over the sequence's key blocks."""
    seq = tl.program_id(0)
    pid_m = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(CU_SEQLENS + seq)
    seqlen = tl.load(CU_SEQLENS + seq + 1) - start
    if pid_m * BLOCK_M >= seqlen:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask_m = offs_m < seqlen
    row0 = start.to(tl.int64)
    Q += row0 * stride_qt + head * stride_qh
    K += row0 * stride_kt + head * stride_kh
    V += row0 * stride_vt + head * stride_vh
    DO += row0 * stride_dot + head * stride_doh
    DQ += row0 * stride_dqt + head * stride_dqh
    LSE += row0 * H + head
    DELTA += row0 * H + head
    q_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + offs_m * H, mask=mask_m, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + offs_m * H, mask=mask_m, other=0.0)
    if HAS_BIAS:
        BIAS += head.to(tl.int64) * stride_bh
        pos_m = tl.load(BIAS_INDEX + row0 + offs_m, mask=mask_m, other=0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, seqlen, BLOCK_N):
        rows_n = start_n + offs_n
        mask_n = rows_n < seqlen
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + rows_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + rows_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            pos_n = tl.load(BIAS_INDEX + row0 + rows_n, mask=mask_n, other=0)
            pairs = pos_m[:, None] * stride_bl + pos_n[None, :]
            qk += _bias_tile(BIAS, pairs, mask_m[:, None] & mask_n[None, :])
        # Keys past the end (k = 0) would give exp2(-lse), which overflows when all real scores are very
        # negative.
        p = tl.exp2(tl.where(mask_n[None, :], qk - lse[:, None], float("-inf")))
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    tl.store(
        DQ + offs_m[:, None] * stride_dqt + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=q_mask
    )


@triton.jit
def _bwd_short_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ_ACC, DQ, DK, DV, CU_SEQLENS, BIAS, BIAS_INDEX, DBIAS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_dot, stride_doh, stride_gt, stride_gh, stride_bh, stride_bl,
    num_seqs, H, scale, qk_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SEQS: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (g, h): the whole backward of sequences g * SEQS ... g * SEQS + SEQS - 1 at head h.

    Key blocks outside, query blocks inside (the transposed formulation of the long dK/dV kernel), so
    each score tile is computed once and feeds dK, dV and dQ. dQ sums over key blocks in DQ_ACC, fp32
    rows that only this program touches (plain loads and stores, no atomics, fixed order); the last
    key block writes dQ itself. DQ, DK, DV and DQ_ACC share the strides (stride_gt, stride_gh). With a
    bias, each score tile's gradient is added into DBIAS (fp32, BIAS's strides).
    """
    head = tl.program_id(1)
    if HAS_BIAS:
        BIAS += head.to(tl.int64) * stride_bh
        DBIAS += head.to(tl.int64) * stride_bh
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    for s in range(SEQS):
        start, seqlen = _sequence(CU_SEQLENS, tl.program_id(0) * SEQS + s, num_seqs)
        row0 = start.to(tl.int64)
        Qs = Q + row0 * stride_qt + head * stride_qh
        Ks = K + row0 * stride_kt + head * stride_kh
        Vs = V + row0 * stride_vt + head * stride_vh
        Os = O + row0 * stride_ot + head * stride_oh
        DOs = DO + row0 * stride_dot + head * stride_doh
        DQ_ACCs = DQ_ACC + row0 * stride_gt + head * stride_gh
        DQs = DQ + row0 * stride_gt + head * stride_gh
        DKs = DK + row0 * stride_gt + head * stride_gh
        DVs = DV + row0 * stride_gt + head * stride_gh
        LSEs = LSE + row0 * H + head
        DELTAs = DELTA + row0 * H + head
        for start_m in range(0, seqlen, BLOCK_M):
            rows_m = start_m + offs_m
            delta = _rows_delta(Os, DOs, rows_m, rows_m < seqlen, stride_ot, stride_dot, offs_d, mask_d)
            tl.store(DELTAs + rows_m * H, delta, mask=rows_m < seqlen)
        # delta and the dQ partial sums pass between this program's threads through global memory: a
        # CTA barrier orders each write before the reads that follow it.
        tl.debug_barrier()
        for start_n in range(0, seqlen, BLOCK_N):
            rows_n = start_n + offs_n
            mask_n = rows_n < seqlen
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(Ks + rows_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(Vs + rows_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
            if HAS_BIAS:
                pos_n = tl.load(BIAS_INDEX + row0 + rows_n, mask=mask_n, other=0)
            dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            for start_m in range(0, seqlen, BLOCK_M):
                rows_m = start_m + offs_m
                mask_m = rows_m < seqlen
                q_mask = mask_m[:, None] & mask_d[None, :]
                q = tl.load(Qs + rows_m[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
                do = tl.load(DOs + rows_m[:, None] * stride_dot + offs_d[None, :], mask=q_mask, other=0.0)
                lse = tl.load(LSEs + rows_m * H, mask=mask_m, other=0.0) * 1.4426950408889634
                delta = tl.load(DELTAs + rows_m * H, mask=mask_m, other=0.0)
                qkT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
                if HAS_BIAS:
                    pos_m = tl.load(BIAS_INDEX + row0 + rows_m, mask=mask_m, other=0)
                    pairs = pos_m[None, :] * stride_bl + pos_n[:, None]  # transposed: (BLOCK_N, BLOCK_M)
                    pair_mask = mask_n[:, None] & mask_m[None, :]
                    qkT += _bias_tile(BIAS, pairs, pair_mask)
                # Padded keys masked as in the long kernels; padded queries load q = dO = 0 and add nothing.
                pT = tl.exp2(tl.where(mask_n[:, None], qkT - lse[None, :], float("-inf")))
                dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
                dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
                dsT = pT * (dpT - delta[None, :])
                if HAS_BIAS:  # d score = d bias
                    tl.atomic_add(DBIAS + pairs, dsT, mask=pair_mask)
                dsT = dsT.to(q.dtype)
                dk += tl.dot(dsT, q, input_precision=PRECISION)
                dq = tl.dot(tl.trans(dsT), k, input_precision=PRECISION)
                tile_m = rows_m[:, None] * stride_gt + offs_d[None, :]
                if start_n > 0:
                    dq += tl.load(DQ_ACCs + tile_m, mask=q_mask, other=0.0)
                if start_n + BLOCK_N < seqlen:
                    tl.store(DQ_ACCs + tile_m, dq, mask=q_mask)
                else:
                    tl.store(DQs + tile_m, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)
            tile = rows_n[:, None] * stride_gt + offs_d[None, :]
            tl.store(DKs + tile, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
            tl.store(DVs + tile, dv.to(DV.dtype.element_ty), mask=kv_mask)
            tl.debug_barrier()


# (BLOCK_M, BLOCK_N, num_warps, num_stages) for Hopper, by kernel and padded head dim, all free of
# register spills under ptxas for sm_90 (tests/test_kernels_compile.py). ViT sequences are short
# (~50-200 tokens), so 64-query blocks waste less work on padding than 128. "fwd_short" and
# "bwd_short" are the short schedule's kernels.
_CONFIGS_16BIT = {
    "fwd": {32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (64, 64, 4, 2)},
    "dkdv": {32: (32, 64, 4, 3), 64: (32, 64, 4, 3), 128: (32, 64, 8, 2)},
    "dq": {32: (64, 32, 4, 3), 64: (64, 32, 4, 3), 128: (64, 32, 8, 2)},
    "fwd_short": {32: (64, 32, 4, 3), 64: (64, 32, 4, 3), 128: (64, 32, 4, 2)},
    "bwd_short": {32: (32, 64, 4, 2), 64: (32, 64, 4, 2), 128: (16, 64, 8, 2)},
}
# With a bias, the score tiles also hold the bias and (backward) its gradient's addresses: the short
# backward at D <= 64 needs twice the warps to stay free of spills; the rest keep their tiles.
_BIAS_CONFIGS_16BIT = {"bwd_short": {32: (32, 64, 8, 2), 64: (32, 64, 8, 2)}}
# fp32 uses exact IEEE dots, which run on FMA units, not tensor cores: small tiles, one per kernel.
_CONFIGS_FP32 = {
    "fwd": (32, 32, 8, 2),
    "dkdv": (32, 32, 8, 2),
    "dq": (32, 32, 8, 2),
    "fwd_short": (32, 32, 8, 3),
    "bwd_short": (32, 16, 8, 2),
}
# The interpreter runs programs one at a time on numpy: tiny blocks keep tests fast.
_INTERPRET_CONFIG = (16, 16, 1, 1)


def block_config(
    kernel: str, dtype: torch.dtype, block_d: int, bias: bool = False
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of kernel "fwd", "dkdv", "dq", "fwd_short", "bwd_short",
    without or with an additive bias."""
    if _INTERPRET:
        return _INTERPRET_CONFIG
    if dtype == torch.float32:
        return _CONFIGS_FP32[kernel]
    if bias and block_d in _BIAS_CONFIGS_16BIT.get(kernel, {}):
        return _BIAS_CONFIGS_16BIT[kernel][block_d]
    return _CONFIGS_16BIT[kernel][block_d]


def short_schedule(direction: str, max_seqlen: int) -> bool:
    """Whether the "fwd" or "bwd" launcher takes the short schedule (whole sequences per program)."""
    return max_seqlen <= SHORT_MAX_SEQLEN[direction]


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact IEEE products (tf32 would cost ~3e-4 relative error); 16-bit: ignored.
    return "ieee" if dtype == torch.float32 else "tf32"


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _bias_args(bias: torch.Tensor | None, bias_index: torch.Tensor | None) -> tuple:
    """(BIAS, BIAS_INDEX, stride_bh, stride_bl) kernel arguments: the bias contiguous, so that its
    fp32 gradient buffer shares its strides; None pointers without a bias (the HAS_BIAS=False
    kernels never read them)."""
    if bias is None:
        return None, None, 0, 0
    bias = bias.contiguous()
    return bias, bias_index, bias.stride(0), bias.stride(1)


def varlen_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    bias: torch.Tensor | None = None,
    bias_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launcher.

    q, k, v: (T, H, D) with stride 1 along D (other strides free); cu_seqlens: (R + 1,) int32;
    max_seqlen: upper bound on every sequence length; bias: None or (H, L, L) float, added to the
    scaled scores at the positions bias_index (T,) int32 in [0, L) of the query and key tokens.
    Returns out (T, H, D) in q's dtype and lse (T, H) fp32, the natural log-sum-exp of each query's
    scores.
    """
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    T, H, D = q.shape
    out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((T, H), dtype=torch.float32, device=q.device)
    num_seqs = cu_seqlens.numel() - 1
    if T == 0 or num_seqs == 0 or max_seqlen <= 0:
        return out, lse
    block_d = triton.next_power_of_2(D)
    bias, bias_index, stride_bh, stride_bl = _bias_args(bias, bias_index)
    args = (
        q, k, v, out, lse, cu_seqlens, bias, bias_index,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), stride_bh, stride_bl,
        num_seqs, H, scale * LOG2E,
    )  # fmt: skip
    meta = {"D": D, "BLOCK_D": block_d, "HAS_BIAS": bias is not None, "PRECISION": _precision(q.dtype)}
    if short_schedule("fwd", max_seqlen):
        block_m, block_n, num_warps, num_stages = block_config(
            "fwd_short", q.dtype, block_d, bias is not None
        )
        _fwd_short_kernel[(triton.cdiv(num_seqs, SEQS_PER_PROGRAM), H)](
            *args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, SEQS=SEQS_PER_PROGRAM,
            num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
    else:
        block_m, block_n, num_warps, num_stages = block_config("fwd", q.dtype, block_d, bias is not None)
        _fwd_kernel[(num_seqs, triton.cdiv(max_seqlen, block_m), H)](
            *args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
    return out, lse


def varlen_attention_backward(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Backward launcher.

    dout, q, k, v, out: (T, H, D); lse: (T, H) fp32 from the forward; cu_seqlens: (R + 1,) int32;
    bias, bias_index: as the forward got them. Returns dq, dk, dv: (T, H, D) contiguous, in q's
    dtype, deterministic (no atomics); and d bias: None without a bias, else (H, L, L) fp32, summed
    over every sequence with atomic adds (deterministic up to fp32 rounding).
    """
    dout, q, k, v, out = (_last_dim_contiguous(x) for x in (dout, q, k, v, out))
    T, H, D = q.shape
    dq, dk, dv = (torch.empty((T, H, D), dtype=q.dtype, device=q.device) for _ in range(3))
    bias, bias_index, stride_bh, stride_bl = _bias_args(bias, bias_index)
    dbias = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=q.device)
    num_seqs = cu_seqlens.numel() - 1
    if T == 0 or num_seqs == 0 or max_seqlen <= 0:
        return dq, dk, dv, dbias
    block_d = triton.next_power_of_2(D)
    meta = {"D": D, "BLOCK_D": block_d, "HAS_BIAS": bias is not None, "PRECISION": _precision(q.dtype)}

    delta = torch.empty((T, H), dtype=torch.float32, device=q.device)
    if short_schedule("bwd", max_seqlen):
        # fp32 partial sums of dQ, for sequences longer than one key block.
        dq_acc = torch.empty((T, H, D), dtype=torch.float32, device=q.device)
        block_m, block_n, num_warps, num_stages = block_config(
            "bwd_short", q.dtype, block_d, bias is not None
        )
        _bwd_short_kernel[(triton.cdiv(num_seqs, SEQS_PER_PROGRAM), H)](
            q, k, v, out, dout, lse, delta, dq_acc, dq, dk, dv, cu_seqlens, bias, bias_index, dbias,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
            stride_bh, stride_bl, num_seqs, H, scale, scale * LOG2E,
            **meta, BLOCK_M=block_m, BLOCK_N=block_n, SEQS=SEQS_PER_PROGRAM,
            num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
        return dq, dk, dv, dbias

    block_t = 16 if _INTERPRET else 64
    _bwd_preprocess_kernel[(triton.cdiv(T, block_t), H)](
        out, dout, delta, T, H,
        out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        D=D, BLOCK_D=block_d, BLOCK_M=block_t,
    )  # fmt: skip

    block_m, block_n, num_warps, num_stages = block_config("dkdv", q.dtype, block_d, bias is not None)
    _bwd_dkdv_kernel[(num_seqs, triton.cdiv(max_seqlen, block_n), H)](
        q, k, v, dout, lse, delta, dk, dv, cu_seqlens, bias, bias_index, dbias,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        stride_bh, stride_bl, H, scale, scale * LOG2E,
        **meta, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip

    block_m, block_n, num_warps, num_stages = block_config("dq", q.dtype, block_d, bias is not None)
    _bwd_dq_kernel[(num_seqs, triton.cdiv(max_seqlen, block_m), H)](
        q, k, v, dout, lse, delta, dq, cu_seqlens, bias, bias_index,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), stride_bh, stride_bl,
        H, scale, scale * LOG2E,
        **meta, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return dq, dk, dv, dbias
