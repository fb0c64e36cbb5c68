"""Triton kernels for residual add + LayerNorm in one pass, forward and backward (Liger-Kernel style).

Rows are tokens of a (T, D) tensor with stride 1 along D. The forward computes the new residual
stream s = x + gamma * y (gamma: an optional per-channel LayerScale) and h = LayerNorm(s) in one read
of x and y, saving each row's mean and 1/std (T,) fp32 for the backward. Without y it is a plain
LayerNorm of x. Arithmetic is fp32 whatever the storage dtypes; s is rounded to its dtype before it is
normalised, so h equals the unfused ``s = x + y; h = layer_norm(s)``.

The backward reads grad_s, grad_h and s once, writes grad_x (and grad_y when it differs from grad_x),
and reduces the weight, bias and LayerScale gradients per program into (P, D) fp32 partial sums that the
launcher adds up: no atomics, deterministic.
"""

import os
from functools import cache

import torch
import triton
import triton.language as tl

from shapkern.kernels.layout import unit_stride_rows

# One row must fit one tile of registers.
MAX_D = 16384
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def add_layer_norm_rows(
    X, Y, G, W, B, S, rows64, cols, mask, mask_d, D, stride_x, stride_y, stride_s, eps,
    HAS_Y: tl.constexpr, HAS_GAMMA: tl.constexpr,
):  # fmt: skip
    """The forward of one tile of rows (rows64 (BLOCK_M, 1) int64, cols (BLOCK_D,), their masks): loads
    x, adds gamma * y and stores s when HAS_Y, and returns h = LayerNorm(s) (fp32), mean and rstd. Shared
    with the fp8 kernel, whose LayerNorm prologue feeds h to its quantisation."""
    s = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_Y:
        y = tl.load(Y + rows64 * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_GAMMA:
            y *= tl.load(G + cols, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        s_out = (s + y).to(S.dtype.element_ty)
        tl.store(S + rows64 * stride_s + cols[None, :], s_out, mask=mask)
        s = s_out.to(tl.float32)
    mean = tl.sum(s, 1) / D
    diff = tl.where(mask, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, 1) / D + eps)
    w = tl.load(W + cols, mask=mask_d, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask_d, other=0.0).to(tl.float32)
    return diff * rstd[:, None] * w[None, :] + b[None, :], mean, rstd


@triton.jit
def _fwd_kernel(
    X, Y, G, W, B, S, H, MEAN, RSTD,
    T, D, stride_x, stride_y, stride_s, stride_h, eps,
    HAS_Y: tl.constexpr, HAS_GAMMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    mask = (rows < T)[:, None] & mask_d[None, :]
    # 64-bit row offsets: T * stride can pass 2**31.
    rows64 = rows.to(tl.int64)[:, None]
    h, mean, rstd = add_layer_norm_rows(
        X, Y, G, W, B, S, rows64, cols, mask, mask_d, D, stride_x, stride_y, stride_s, eps, HAS_Y, HAS_GAMMA
    )
    tl.store(H + rows64 * stride_h + cols[None, :], h.to(H.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=rows < T)
    tl.store(RSTD + rows, rstd, mask=rows < T)


@triton.jit
def _bwd_kernel(
    DS, DH, S, Y, G, W, MEAN, RSTD, DX, DY, DW, DB, DG,
    T, D, stride_ds, stride_dh, stride_s, stride_y, stride_dx, stride_dy, blocks_per_program,
    HAS_DS: tl.constexpr, STORE_DY: tl.constexpr, HAS_GAMMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program: blocks_per_program consecutive blocks of BLOCK_M rows, then a row of each partial sum."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    w = tl.load(W + cols, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_GAMMA:
        g = tl.load(G + cols, mask=mask_d, other=0.0).to(tl.float32)
        dg = tl.zeros([BLOCK_D], tl.float32)
    dw = tl.zeros([BLOCK_D], tl.float32)
    db = tl.zeros([BLOCK_D], tl.float32)
    for i in range(blocks_per_program):
        rows = (pid * blocks_per_program + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = rows < T
        mask = mask_m[:, None] & mask_d[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        mean = tl.load(MEAN + rows, mask=mask_m, other=0.0)
        rstd = tl.load(RSTD + rows, mask=mask_m, other=0.0)
        s = tl.load(S + rows64 * stride_s + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(DH + rows64 * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        wdh = dh * w[None, :]
        c1 = tl.sum(xhat * wdh, 1) / D
        c2 = tl.sum(wdh, 1) / D
        dx = (wdh - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + rows64 * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_GAMMA:
            y = tl.load(Y + rows64 * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dg += tl.sum(dx * y, 0)
            dx *= g[None, :]
        if STORE_DY:
            tl.store(DY + rows64 * stride_dy + cols[None, :], dx.to(DY.dtype.element_ty), mask=mask)
        dw += tl.sum(dh * xhat, 0)
        db += tl.sum(dh, 0)
    tl.store(DW + pid * D + cols, dw, mask=mask_d)
    tl.store(DB + pid * D + cols, db, mask=mask_d)
    if HAS_GAMMA:
        tl.store(DG + pid * D + cols, dg, mask=mask_d)


def block_config(D: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_M, num_warps): one row per BLOCK_D tile, ~4096 elements (16 per thread) a tile."""
    block_d = triton.next_power_of_2(D)
    if _INTERPRET:
        return block_d, 2, 1
    block_m = max(1, 4096 // block_d)
    return block_d, block_m, 8 if block_m * block_d <= 8192 else 16


@cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _backward_programs(device: torch.device, row_blocks: int) -> int:
    # A few resident programs per SM hide memory latency; more would only grow the partial sums.
    target = 4 * _num_sms(device) if device.type == "cuda" else 2
    return max(1, min(row_blocks, target))


def stores_grad_y(x_dtype: torch.dtype, y_dtype: torch.dtype | None, has_layer_scale: bool) -> bool:
    """Whether the backward writes grad_y: not for a plain LayerNorm, nor when it equals grad_x."""
    return y_dtype is not None and (has_layer_scale or y_dtype != x_dtype)


def layer_norm_forward(
    x: torch.Tensor,
    y: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    layer_scale: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype | None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward launcher.

    x: (T, D); y: (T, D) or None (plain LayerNorm of x); weight, bias, layer_scale: (D,) (layer_scale
    only with y). Returns s (T, D) in the promoted dtype of x and y (None without y), h (T, D) in
    out_dtype (default: s's dtype, or x's without y), mean and rstd (T,) fp32.
    """
    x = unit_stride_rows(x)
    T, D = x.shape
    s_dtype = x.dtype if y is None else torch.promote_types(x.dtype, y.dtype)
    s = None if y is None else torch.empty((T, D), dtype=s_dtype, device=x.device)
    h = torch.empty((T, D), dtype=out_dtype or s_dtype, device=x.device)
    mean = torch.empty(T, dtype=torch.float32, device=x.device)
    rstd = torch.empty(T, dtype=torch.float32, device=x.device)
    if T == 0:
        return s, h, mean, rstd
    block_d, block_m, num_warps = block_config(D)
    # Absent tensors are replaced by ones of the right kind that the kernel never reads or writes.
    y = x if y is None else unit_stride_rows(y)
    gamma = weight if layer_scale is None else layer_scale
    s_or_h = h if s is None else s
    _fwd_kernel[(triton.cdiv(T, block_m),)](
        x, y, gamma, weight, bias, s_or_h, h, mean, rstd,
        T, D, x.stride(0), y.stride(0), s_or_h.stride(0), h.stride(0), eps,
        HAS_Y=s is not None, HAS_GAMMA=layer_scale is not None, BLOCK_M=block_m, BLOCK_D=block_d,
        num_warps=num_warps,
    )  # fmt: skip
    return s, h, mean, rstd


def layer_norm_backward(
    grad_s: torch.Tensor | None,
    grad_h: torch.Tensor,
    s: torch.Tensor,
    y: torch.Tensor | None,
    weight: torch.Tensor,
    layer_scale: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    x_dtype: torch.dtype,
    y_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Backward launcher.

    grad_s: (T, D) or None (plain LayerNorm); grad_h, s: (T, D), s being the normalised input (x for a
    plain LayerNorm); y: (T, D), read only with layer_scale; mean, rstd: (T,) fp32 from the forward;
    x_dtype, y_dtype: dtypes of the inputs (y_dtype None for a plain LayerNorm).
    Returns grad_x (T, D) in x_dtype; grad_y (T, D) in y_dtype, or None when it equals grad_x (no
    layer_scale, same dtype; also None for a plain LayerNorm); grad_weight, grad_bias (D,) and
    grad_layer_scale (D,) or None, fp32.
    """
    grad_h, s = unit_stride_rows(grad_h), unit_stride_rows(s)
    T, D = s.shape
    has_ds, has_gamma = grad_s is not None, layer_scale is not None
    store_dy = stores_grad_y(x_dtype, y_dtype, has_gamma)
    dx = torch.empty((T, D), dtype=x_dtype, device=s.device)
    dy = torch.empty((T, D), dtype=y_dtype, device=s.device) if store_dy else None
    block_d, block_m, num_warps = block_config(D)
    row_blocks = triton.cdiv(T, block_m)
    blocks_per_program = triton.cdiv(row_blocks, _backward_programs(s.device, row_blocks))
    programs = triton.cdiv(row_blocks, blocks_per_program) if T else 0
    # Per-program partial sums of the weight, bias and LayerScale gradients.
    partials = [torch.zeros((max(programs, 1), D), device=s.device) for _ in range(3 if has_gamma else 2)]
    if T:
        # Absent tensors are replaced by ones of the right kind that the kernel never reads or writes.
        grad_s = grad_h if grad_s is None else unit_stride_rows(grad_s)
        y = s if y is None or not has_gamma else unit_stride_rows(y)
        _bwd_kernel[(programs,)](
            grad_s, grad_h, s, y, layer_scale if has_gamma else weight, weight, mean, rstd, dx,
            dx if dy is None else dy, partials[0], partials[1], partials[-1],
            T, D, grad_s.stride(0), grad_h.stride(0), s.stride(0), y.stride(0), dx.stride(0),
            dx.stride(0) if dy is None else dy.stride(0), blocks_per_program,
            HAS_DS=has_ds, STORE_DY=store_dy, HAS_GAMMA=has_gamma,
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
        )  # fmt: skip
    grad_weight, grad_bias, *grad_gamma = (partial.sum(0) for partial in partials)
    return dx, dy, grad_weight, grad_bias, grad_gamma[0] if has_gamma else None
