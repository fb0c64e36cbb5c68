"""Triton kernel for fp8 (e4m3) activations: per-row quantisation, fused with the op that produces the row.

Each program quantises BLOCK_M whole rows of a (T, K) tensor. It computes the activation a in fp32 (the
input itself, its exact GELU, its LayerNorm, or the LayerNorm of a residual add, which it also stores),
then per row amax = max(max |a|, amax_floor), scale = amax / 448 and q = e4m3(a * (448 / amax)), so that
a ≈ q * scale. Forward only: no statistics are saved.

The e4m3 rounding is done in fp32 arithmetic, to nearest with ties to even, before the cast, which is
then exact: the kernel matches ``torch``'s ``.to(torch.float8_e4m3fn)`` bit for bit whatever rounding
mode a Triton version's fp32 -> fp8 conversion uses (the CPU interpreter's conversion neither carries
into the exponent nor makes subnormals, so there only normal e4m3 values come out right).
"""

import torch
import triton
import triton.language as tl

from shapkern.kernels.layer_norm import MAX_D, add_layer_norm_rows, block_config
from shapkern.kernels.layout import unit_stride_rows

__all__ = ["MAX_K", "PROLOGUES", "quantize_rows_forward"]

# e4m3's largest finite value (torch.finfo(torch.float8_e4m3fn).max), a compile-time constant.
_E4M3_MAX = tl.constexpr(448.0)
# One row must fit one tile of registers, as in the LayerNorm kernels.
MAX_K = MAX_D
PROLOGUES = ("none", "gelu", "layer_norm")


@triton.jit
def _round_e4m3(v):
    """fp32 v with |v| <= 448 rounded to the nearest e4m3 value, ties to even (an fp32 result)."""
    exponent = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    # e4m3 spacing at v: 2^(e - 3) in the normal range (e >= -6), 2^-9 among the subnormals.
    ulp_exponent = tl.maximum(exponent, -6) - 3
    # magic = 1.5 * 2^(ulp_exponent + 23): fp32 numbers near it are ulp apart, so v + magic rounds v to
    # a multiple of ulp (to even, magic being an even multiple) and subtracting magic is exact.
    magic = (((ulp_exponent + 150) << 23) | 0x400000).to(tl.float32, bitcast=True)
    return (v + magic) - magic


@triton.jit
def _quantize_kernel(
    X, Y, G, W, B, S, Q, SCALE,
    T, K, stride_x, stride_y, stride_s, stride_q, eps, amax_floor,
    PROLOGUE: tl.constexpr, HAS_Y: tl.constexpr, HAS_GAMMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    mask_k = cols < K
    mask = (rows < T)[:, None] & mask_k[None, :]
    # 64-bit row offsets: T * stride can pass 2**31.
    rows64 = rows.to(tl.int64)[:, None]
    if PROLOGUE == "layer_norm":
        # The residual add (s stored, rounded to its dtype before it is normalised) and the LayerNorm
        # of the add + LayerNorm kernel.
        a, _, _ = add_layer_norm_rows(
            X, Y, G, W, B, S, rows64, cols, mask, mask_k, K, stride_x, stride_y, stride_s, eps,
            HAS_Y, HAS_GAMMA,
        )  # fmt: skip
    else:
        a = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if PROLOGUE == "gelu":
            a = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
    a = tl.where(mask, a, 0.0)
    amax = tl.maximum(tl.max(tl.abs(a), 1), amax_floor)
    # IEEE divisions (Triton's default fp32 division is approximate), one per row.
    inv_scale = tl.math.div_rn(tl.full([BLOCK_M], _E4M3_MAX, tl.float32), amax)
    q = _round_e4m3(a * inv_scale[:, None])
    tl.store(Q + rows64 * stride_q + cols[None, :], q.to(Q.dtype.element_ty), mask=mask)
    tl.store(SCALE + rows, tl.math.div_rn(amax, tl.full([BLOCK_M], _E4M3_MAX, tl.float32)), mask=rows < T)


def quantize_rows_forward(x, y, weight, bias, layer_scale, eps, prologue, s_dtype, amax_floor):
    """Launcher.

    x: (T, K); prologue: ``"none"`` (quantise x), ``"gelu"`` (quantise exact GELU(x)) or ``"layer_norm"``
    (quantise LayerNorm(s) with weight, bias (K,) and eps, where s = x + layer_scale * y when y (T, K) is
    given, s = x otherwise; layer_scale (K,) or None); amax_floor: the amax of an all-zero row.
    Returns s (T, K) in s_dtype (None without y), q (T, K) float8_e4m3fn and scale (T, 1) fp32.
    """
    if prologue not in PROLOGUES:
        raise ValueError(f"prologue must be one of {PROLOGUES}, got {prologue!r}")
    x = unit_stride_rows(x)
    T, K = x.shape
    q = torch.empty((T, K), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((T, 1), dtype=torch.float32, device=x.device)
    s = None if y is None else torch.empty((T, K), dtype=s_dtype, device=x.device)
    if T == 0:
        return s, q, scale
    block_k, block_m, num_warps = block_config(K)
    # Absent tensors are replaced by ones of the right kind that the kernel never reads or writes.
    y = x if y is None else unit_stride_rows(y)
    weight = x if weight is None else weight
    s_or_q = q if s is None else s
    _quantize_kernel[(triton.cdiv(T, block_m),)](
        x, y, weight if layer_scale is None else layer_scale, weight, x if bias is None else bias,
        s_or_q, q, scale,
        T, K, x.stride(0), y.stride(0), s_or_q.stride(0), q.stride(0), eps, amax_floor,
        PROLOGUE=prologue, HAS_Y=s is not None, HAS_GAMMA=layer_scale is not None,
        BLOCK_M=block_m, BLOCK_K=block_k, num_warps=num_warps,
    )  # fmt: skip
    return s, q, scale
