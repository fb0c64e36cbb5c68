"""Triton kernels for the reductions over coalitions, as tensor-core GEMMs on bit-packed coalitions.

Packed coalitions are (B, M, W) int32: player n of coalition m is bit ``n % 32`` of word ``n // 32``.
Every kernel is a GEMM per image whose 0/1 operand Z (M, N) is unpacked from the packed words
straight into the dot's tile (a load of the words, a shift and a mask), never stored:

- ``coalition_reduce_forward``: sums = Zᵀ (w ⊙ V) (N, K) and weight_sums = Zᵀ w (N,);
- ``coalition_reduce_backward``: grad_values = w ⊙ (Z G) (M, K) and
  grad_weights = rowsum((Z G) ⊙ V) + Z g_w (M,);
- ``coalition_gram``: A = Zᵀ diag(w) Z (N, N), only the tiles on and above the diagonal, each
  stored twice (A is exactly symmetric).

Precision ("2xTF32"): Z is exact in tf32. The other operand x (w ⊙ V, G, or w) is split in fp32
as x = hi + lo, hi keeping the top 11 significand bits of x (exact in tf32) and lo = x - hi (exact
in fp32, its top 11 bits kept by the tensor core), and both go through a tf32 dot into an fp32
accumulator. Each product then carries a relative error below 2**-20, against 2**-11 for a
plain tf32 dot (~3e-4 on these sums, outside fp32's 1e-5 tolerance), at two tf32 dots' cost: still
~3.5x the H100/H200 data-sheet rate of "ieee" fp32 dots, which run on the FMA units. A three-way
split ("tf32x3") would waste a dot on Z's zero low part. float16/bfloat16 inputs are read as fp32
and take the same path; outputs are cast to the input dtype. The Gram matrix in float64 uses fp64 dots.

Deterministic: every program owns one output tile and loops over the reduced dimension in a fixed
order; no atomics. Grids are flat (no 65535 limit), the fastest index being the tile that shares
the streamed operand, so that its programs run together and read it from L2.
"""

import contextlib
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _bits(ptrs, shift, ok):
    """0/1 fp32 tile: bit ``shift`` of the packed words at ``ptrs``, 0 where not ``ok``."""
    words = tl.load(ptrs, mask=ok, other=0)
    return ((words >> shift) & 1).to(tl.float32)


@triton.jit
def _split_tf32(x):
    """x = hi + lo exactly in fp32, hi = x with its low 13 significand bits cleared (a tf32 value)."""
    hi = (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    return hi, x - hi


@triton.jit
def _reduce_fwd_kernel(
    MASKS, VALUES, WEIGHTS, SUMS, WSUMS,
    M, W, N, K, n_tiles, k_tiles,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Program (player tile, value tile, image): loops over coalitions; the first value tile also
    sums the weights (CUDA cores, fp32)."""
    pid = tl.program_id(0)
    tile_n = pid % n_tiles
    tile_k = (pid // n_tiles) % k_tiles
    b = (pid // (n_tiles * k_tiles)).to(tl.int64)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    word_ok = (offs_n >> 5) < W
    k_ok = offs_k < K
    shift = (offs_n & 31)[:, None]
    z_ptrs = MASKS + b * M * W + offs_m[None, :] * W + (offs_n >> 5)[:, None]  # (BLOCK_N, BLOCK_M)
    v_ptrs = VALUES + b * M * K + offs_m[:, None] * K + offs_k[None, :]  # (BLOCK_M, BLOCK_K)
    w_ptrs = WEIGHTS + b * M + offs_m
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    wacc = tl.zeros((BLOCK_N,), tl.float32)
    for m0 in range(0, M, BLOCK_M):
        m_ok = offs_m < M - m0
        w = tl.load(w_ptrs, mask=m_ok, other=0.0).to(tl.float32)
        v = tl.load(v_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        z = _bits(z_ptrs, shift, word_ok[:, None] & m_ok[None, :])
        hi, lo = _split_tf32(v * w[:, None])
        acc = tl.dot(z, hi, acc, input_precision="tf32")
        acc = tl.dot(z, lo, acc, input_precision="tf32")
        if tile_k == 0:
            wacc += tl.sum(z * w[None, :], 1)
        z_ptrs += BLOCK_M * W
        v_ptrs += BLOCK_M * K
        w_ptrs += BLOCK_M
    n_ok = offs_n < N
    out_ptrs = SUMS + b * N * K + offs_n[:, None] * K + offs_k[None, :]
    tl.store(out_ptrs, acc.to(SUMS.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])
    if tile_k == 0:
        tl.store(WSUMS + b * N + offs_n, wacc.to(WSUMS.dtype.element_ty), mask=n_ok)


@triton.jit
def _reduce_bwd_kernel(
    MASKS, VALUES, WEIGHTS, GRAD_SUMS, GRAD_WSUMS, GRAD_VALUES, GRAD_W_PARTS,
    M, W, N, K, m_tiles, k_tiles,
    NEED_VALUES: tl.constexpr, NEED_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Program (coalition tile, value tile, image): (Z G) over all players, then grad_values and this
    value tile's part of grad_weights (GRAD_W_PARTS (B, M, k_tiles), summed by the launcher; the first
    tile adds Z g_w). BLOCK_N is a multiple of 32, so a player tile spans whole packed words."""
    pid = tl.program_id(0)
    tile_m = pid % m_tiles
    tile_k = (pid // m_tiles) % k_tiles
    b = (pid // (m_tiles * k_tiles)).to(tl.int64)
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    k_ok = offs_k < K
    shift = (offs_n & 31)[None, :]
    z_ptrs = MASKS + b * M * W + offs_m[:, None] * W + (offs_n >> 5)[None, :]  # (BLOCK_M, BLOCK_N)
    g_ptrs = GRAD_SUMS + b * N * K + offs_n[:, None] * K + offs_k[None, :]  # (BLOCK_N, BLOCK_K)
    gw_ptrs = GRAD_WSUMS + b * N + offs_n
    acc = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    gz = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n_ok = offs_n < N - n0
        z = _bits(z_ptrs, shift, m_ok[:, None] & ((offs_n + n0) >> 5 < W)[None, :])
        g = tl.load(g_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        hi, lo = _split_tf32(g)
        acc = tl.dot(z, hi, acc, input_precision="tf32")
        acc = tl.dot(z, lo, acc, input_precision="tf32")
        if NEED_WEIGHTS:
            if tile_k == 0:
                gw = tl.load(gw_ptrs, mask=n_ok, other=0.0).to(tl.float32)
                gz += tl.sum(z * gw[None, :], 1)
        z_ptrs += BLOCK_N // 32
        g_ptrs += BLOCK_N * K
        gw_ptrs += BLOCK_N
    tile_ok = m_ok[:, None] & k_ok[None, :]
    rows = (b * M + offs_m[:, None]) * K + offs_k[None, :]  # 64-bit: M * K may pass 2**31
    if NEED_VALUES:
        w = tl.load(WEIGHTS + b * M + offs_m, mask=m_ok, other=0.0).to(tl.float32)
        tl.store(GRAD_VALUES + rows, (acc * w[:, None]).to(GRAD_VALUES.dtype.element_ty), mask=tile_ok)
    if NEED_WEIGHTS:
        v = tl.load(VALUES + rows, mask=tile_ok, other=0.0).to(tl.float32)
        part = tl.sum(acc * v, 1) + gz
        tl.store(GRAD_W_PARTS + (b * M + offs_m) * k_tiles + tile_k, part, mask=m_ok)


@triton.jit
def _gram_kernel(
    MASKS, WEIGHTS, OUT, M, W, N, n_tiles,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, FP64: tl.constexpr,
):  # fmt: skip
    """Program (row tile i, column tile j, image), j >= i: loops over coalitions, stores the tile at
    (i, j) and its transpose at (j, i); a diagonal tile is averaged with its transpose."""
    pid = tl.program_id(0)
    tile_i = pid % n_tiles
    tile_j = (pid // n_tiles) % n_tiles
    b = (pid // (n_tiles * n_tiles)).to(tl.int64)
    if tile_j < tile_i:
        return
    offs_i = tile_i * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tile_j * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    base = MASKS + b * M * W
    zi_ptrs = base + offs_m[None, :] * W + (offs_i >> 5)[:, None]  # (BLOCK_N, BLOCK_M)
    zj_ptrs = base + offs_m[:, None] * W + (offs_j >> 5)[None, :]  # (BLOCK_M, BLOCK_N)
    i_words = ((offs_i >> 5) < W)[:, None]
    j_words = ((offs_j >> 5) < W)[None, :]
    w_ptrs = WEIGHTS + b * M + offs_m
    acc = tl.zeros((BLOCK_N, BLOCK_N), tl.float64 if FP64 else tl.float32)
    for m0 in range(0, M, BLOCK_M):
        m_ok = offs_m < M - m0
        w = tl.load(w_ptrs, mask=m_ok, other=0.0)
        zi = _bits(zi_ptrs, (offs_i & 31)[:, None], i_words & m_ok[None, :])
        zj = _bits(zj_ptrs, (offs_j & 31)[None, :], m_ok[:, None] & j_words)
        if FP64:
            zw = zj.to(tl.float64) * w.to(tl.float64)[:, None]
            acc = tl.dot(zi.to(tl.float64), zw, acc, input_precision="ieee")
        else:
            hi, lo = _split_tf32(w.to(tl.float32))
            acc = tl.dot(zi, zj * hi[:, None], acc, input_precision="tf32")
            acc = tl.dot(zi, zj * lo[:, None], acc, input_precision="tf32")
        zi_ptrs += BLOCK_M * W
        zj_ptrs += BLOCK_M * W
        w_ptrs += BLOCK_M
    if tile_i == tile_j:
        acc = (acc + tl.trans(acc)) * 0.5
    ok = (offs_i < N)[:, None] & (offs_j < N)[None, :]
    out = acc.to(OUT.dtype.element_ty)
    OUT += b * N * N
    tl.store(OUT + offs_i[:, None] * N + offs_j[None, :], out, mask=ok)
    if tile_j > tile_i:
        tl.store(OUT + offs_j[None, :] * N + offs_i[:, None], out, mask=ok)


# Tile sizes, num_warps and num_stages per kernel, for Hopper: sm_90 builds without register spills
# (tests/test_kernels_compile_reduce.py); the interpreter runs programs one at a time on numpy, where small
# tiles keep tests fast.
CONFIGS = {
    "forward": {"BLOCK_N": 64, "BLOCK_K": 128, "BLOCK_M": 32, "num_warps": 8, "num_stages": 3},
    "backward": {"BLOCK_M": 64, "BLOCK_K": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3},
    "gram": {"BLOCK_N": 64, "BLOCK_M": 32, "num_warps": 4, "num_stages": 3},
    "gram_fp64": {"BLOCK_N": 32, "BLOCK_M": 32, "num_warps": 4, "num_stages": 2},
}
_INTERPRET_CONFIGS = {
    "forward": {"BLOCK_N": 32, "BLOCK_K": 16, "BLOCK_M": 16},
    "backward": {"BLOCK_M": 16, "BLOCK_K": 16, "BLOCK_N": 32},
    "gram": {"BLOCK_N": 16, "BLOCK_M": 16},
    "gram_fp64": {"BLOCK_N": 16, "BLOCK_M": 16},
}


def _on_device(x: torch.Tensor):
    """Launch on x's GPU (Triton launches on the current device); CPU tensors run interpreted."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def block_config(kernel: str) -> dict:
    """Launch parameters of kernel "forward", "backward", "gram" or "gram_fp64"."""
    return dict(_INTERPRET_CONFIGS[kernel] if _INTERPRET else CONFIGS[kernel])


def coalition_reduce_forward(
    packed: torch.Tensor, values: torch.Tensor, weights: torch.Tensor, num_players: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """sums (B, N, K) and weight_sums (B, N) in the dtype of values.

    packed: (B, M, W) int32 with W >= ceil(N / 32); values: (B, M, K) float32/float16/bfloat16;
    weights: (B, M) in the dtype of values; num_players: N. Inputs are made contiguous.
    """
    packed, values, weights = packed.contiguous(), values.contiguous(), weights.contiguous()
    B, M, K = values.shape
    N, W = num_players, packed.shape[2]
    sums = values.new_empty((B, N, K))
    weight_sums = values.new_empty((B, N))
    if B == 0 or N == 0:
        return sums, weight_sums
    cfg = block_config("forward")
    n_tiles = triton.cdiv(N, cfg["BLOCK_N"])
    k_tiles = max(1, triton.cdiv(K, cfg["BLOCK_K"]))  # one tile even for K = 0: it writes weight_sums
    with _on_device(values):
        _reduce_fwd_kernel[(n_tiles * k_tiles * B,)](
            packed, values, weights, sums, weight_sums, M, W, N, K, n_tiles, k_tiles, **cfg
        )
    return sums, weight_sums


def coalition_reduce_backward(
    grad_sums: torch.Tensor,
    grad_weight_sums: torch.Tensor,
    packed: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    num_players: int,
    need_values: bool = True,
    need_weights: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`coalition_reduce_forward`: grad_values (B, M, K), grad_weights (B, M).

    grad_sums: (B, N, K); grad_weight_sums: (B, N); the other arguments as in the forward. A gradient
    not asked for (``need_*``) is not computed and returned as None.
    """
    grad_sums, grad_weight_sums = grad_sums.contiguous(), grad_weight_sums.contiguous()
    packed, values, weights = packed.contiguous(), values.contiguous(), weights.contiguous()
    B, M, K = values.shape
    N, W = num_players, packed.shape[2]
    cfg = block_config("backward")
    m_tiles = triton.cdiv(M, cfg["BLOCK_M"])
    k_tiles = max(1, triton.cdiv(K, cfg["BLOCK_K"]))
    grad_values = torch.empty_like(values) if need_values else None
    parts = values.new_empty((B, M, k_tiles), dtype=torch.float32) if need_weights else None
    if B * M > 0 and (need_values or need_weights):
        with _on_device(values):
            _reduce_bwd_kernel[(m_tiles * k_tiles * B,)](
                packed, values, weights, grad_sums, grad_weight_sums,
                values if grad_values is None else grad_values, values if parts is None else parts,
                M, W, N, K, m_tiles, k_tiles,
                NEED_VALUES=need_values, NEED_WEIGHTS=need_weights, **cfg,
            )  # fmt: skip
    grad_weights = None if parts is None else parts.sum(-1).to(weights.dtype)
    return grad_values, grad_weights


def coalition_gram(packed: torch.Tensor, weights: torch.Tensor, num_players: int) -> torch.Tensor:
    """A (B, N, N) = sum_m weights[b, m] z_m z_mᵀ in the dtype of weights, exactly symmetric.

    packed: (B, M, W) int32 with W >= ceil(N / 32); weights: (B, M) floating (float64 uses fp64 dots,
    the others tf32 pairs into fp32); num_players: N.
    """
    packed, weights = packed.contiguous(), weights.contiguous()
    B, M, W = packed.shape
    N = num_players
    out = weights.new_empty((B, N, N))
    if B == 0 or N == 0:
        return out
    fp64 = weights.dtype == torch.float64
    cfg = block_config("gram_fp64" if fp64 else "gram")
    n_tiles = triton.cdiv(N, cfg["BLOCK_N"])
    with _on_device(weights):
        _gram_kernel[(n_tiles * n_tiles * B,)](packed, weights, out, M, W, N, n_tiles, FP64=fp64, **cfg)
    return out
