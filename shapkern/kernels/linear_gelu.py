"""Triton GEMM with a bias + exact (erf) GELU epilogue, the fc1 of a transformer MLP, and its backward pass.

Forward: y = GELU(x @ Wᵀ + b) for x (T, K), W (N, K) (nn.Linear's layout), b (N,). The bias and the
GELU are applied to the fp32 accumulator before the only store, so the (T, N) pre-activation never goes
through memory, unless a backward needs it: then the epilogue also stores z = x @ Wᵀ + b in the input
dtype (the tensor eager PyTorch saves for GELU's backward), at the cost of one extra write instead of
eager's write, read and write.

Backward: one elementwise pass computes dz = dy * GELU'(z) and reduces the bias gradient over rows into
per-program partial sums (no atomics); the launcher's caller runs the two GEMMs dx = dz @ W and
dW = dzᵀ @ x in cuBLAS. GELU(z) = z Φ(z), GELU'(z) = Φ(z) + z φ(z), with Φ, φ the normal cdf and pdf.
"""

import os
from functools import cache

import torch
import triton
import triton.language as tl

from shapkern.kernels.layout import unit_stride_rows

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _fwd_kernel(
    X, W, B, Y, Z,
    M, N, K, stride_xm, stride_wn, stride_ym, stride_zm,
    STORE_Z: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row blocks sweep the column blocks together, so their x tiles stay in L2.
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows and columns past the edges wrap around to valid memory, so the loads need only a K mask;
    # their results are never stored. 64-bit offsets: T * stride can pass 2**31.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = W + cols[None, :] * stride_wn + offs_k[:, None]  # the (BLOCK_K, BLOCK_N) tile of Wᵀ
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    # The epilogue runs on the two column halves of the tile in turn: GELU's temporaries then live next to
    # half the accumulator, not all of it (a 128 x 256 tile spills otherwise).
    acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
    first_n = pid_n * BLOCK_N
    _store_gelu(acc0, B, Y, Z, offs_m, first_n, M, N, stride_ym, stride_zm, STORE_Z, BLOCK_N // 2)
    _store_gelu(
        acc1, B, Y, Z, offs_m, first_n + BLOCK_N // 2, M, N, stride_ym, stride_zm, STORE_Z, BLOCK_N // 2
    )


@triton.jit
def _store_gelu(
    acc, B, Y, Z, offs_m, first_n, M, N, stride_ym, stride_zm, STORE_Z: tl.constexpr, BLOCK_N: tl.constexpr
):
    """y = GELU(acc + bias) (and z = acc + bias) for the rows offs_m and BLOCK_N columns from first_n."""
    offs_n = first_n + tl.arange(0, BLOCK_N)
    z = acc + tl.load(B + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    out_rows = offs_m.to(tl.int64)[:, None]
    tl.store(Y + out_rows * stride_ym + offs_n[None, :], y.to(Y.dtype.element_ty), mask=mask)
    if STORE_Z:
        tl.store(Z + out_rows * stride_zm + offs_n[None, :], z.to(Z.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(
    DY, Z, DZ, DB, M, N, stride_dy, stride_z, stride_dz, blocks_per_program,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Program (j, i): column block j, row blocks from i * blocks_per_program; row i of the bias partials."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    pid_m = tl.program_id(1)
    mask_n = cols < N
    db = tl.zeros([BLOCK_N], tl.float32)
    for i in range(blocks_per_program):
        rows = (pid_m * blocks_per_program + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & mask_n[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        z = tl.load(Z + rows64 * stride_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        dz = dy * (cdf + z * pdf)
        tl.store(DZ + rows64 * stride_dz + cols[None, :], dz.to(DZ.dtype.element_ty), mask=mask)
        db += tl.sum(dz, 0)
    tl.store(DB + pid_m * N + cols, db, mask=mask_n)


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages). 16-bit: two warpgroups of Hopper wgmma
# on a 128 x 256 tile with a 3-stage pipeline (144 KiB of shared memory), free of register spills under
# ptxas for sm_90 with the GELU epilogue (tests/test_kernels_compile_fused.py).
GEMM_CONFIG_16BIT = (128, 256, 64, 8, 8, 3)
# fp32 uses exact IEEE dots on FMA units, not tensor cores: a smaller tile.
GEMM_CONFIG_FP32 = (64, 64, 32, 8, 4, 3)
# The interpreter runs programs one at a time on numpy: tiny blocks keep tests fast.
_INTERPRET_GEMM_CONFIG = (16, 16, 16, 2, 1, 1)
# (BLOCK_M, BLOCK_N, num_warps) of the elementwise backward: 4096 elements a tile, 32 per thread.
_BWD_CONFIG = (16, 16, 1) if _INTERPRET else (32, 128, 4)


def gemm_config(dtype: torch.dtype) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) of the forward GEMM for dtype."""
    if _INTERPRET:
        return _INTERPRET_GEMM_CONFIG
    return GEMM_CONFIG_FP32 if dtype == torch.float32 else GEMM_CONFIG_16BIT


@cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def linear_gelu_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    store_preactivation: bool,
    config: tuple[int, int, int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward launcher.

    x: (T, K); weight: (N, K) in x's dtype; bias: (N,), any floating dtype. config overrides
    ``gemm_config`` (tile sweeps). Returns y = GELU(x @ weightᵀ + bias) (T, N) in x's dtype and, if
    store_preactivation, z = x @ weightᵀ + bias (T, N) in x's dtype, else None.
    """
    x, weight = unit_stride_rows(x), unit_stride_rows(weight)
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    z = torch.empty((M, N), dtype=x.dtype, device=x.device) if store_preactivation else None
    if M == 0 or N == 0:
        return y, z
    block_m, block_n, block_k, group_m, num_warps, num_stages = config or gemm_config(x.dtype)
    _fwd_kernel[(triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)](
        x, weight, bias, y, y if z is None else z,
        M, N, K, x.stride(0), weight.stride(0), y.stride(0), y.stride(0) if z is None else z.stride(0),
        STORE_Z=store_preactivation, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return y, z


def gelu_backward(grad_y: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward launcher of the epilogue.

    grad_y, z: (T, N). Returns dz = grad_y * GELU'(z) (T, N) in z's dtype and the bias gradient
    dz.sum(0) (N,) fp32, summed from the fp32 values of dz.
    """
    grad_y, z = unit_stride_rows(grad_y), unit_stride_rows(z)
    M, N = z.shape
    dz = torch.empty((M, N), dtype=z.dtype, device=z.device)
    block_m, block_n, num_warps = _BWD_CONFIG
    col_blocks, row_blocks = triton.cdiv(N, block_n), triton.cdiv(M, block_m)
    # About four resident programs per SM in all; fewer row programs keep the partial sums small.
    target = 4 * _num_sms(z.device) if z.is_cuda else 2
    blocks_per_program = triton.cdiv(row_blocks, max(1, target // max(col_blocks, 1)))
    row_programs = triton.cdiv(row_blocks, blocks_per_program) if M else 0
    partial = torch.zeros((max(row_programs, 1), N), dtype=torch.float32, device=z.device)
    if M and N:
        _bwd_kernel[(col_blocks, row_programs)](
            grad_y, z, dz, partial, M, N, grad_y.stride(0), z.stride(0), dz.stride(0), blocks_per_program,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )  # fmt: skip
    return dz, partial.sum(0)
