import math
import os

import pytest
import torch

from shapkern.kernels.linear_gelu import gelu_backward, linear_gelu_forward
from shapkern.ops.linear_gelu import _check_inputs, linear_gelu, linear_gelu_reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter runs Triton kernels on CPU tensors.
KERNEL_DEVICE = "cpu" if INTERPRET else "cuda"
needs_kernels = pytest.mark.skipif(
    not (INTERPRET or torch.cuda.is_available()),
    reason="Triton kernels need TRITON_INTERPRET=1 or a CUDA GPU",
)
fused_op = torch.ops.shapkern.linear_gelu_fwd
# Error allowed against float64, relative to the largest magnitude of the expected tensor.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_inputs(T, K, N, dtype=torch.float32, bias_dtype=None, device="cpu", seed=0):
    """x (T, K), weight (N, K) scaled like nn.Linear's init so pre-activations are O(1), bias (N,)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=gen, dtype=torch.float64)
    weight = torch.randn(N, K, generator=gen, dtype=torch.float64) / math.sqrt(K)
    bias = torch.randn(N, generator=gen, dtype=torch.float64) * 0.5
    return (
        x.to(device, dtype).requires_grad_(),
        weight.to(device, dtype).requires_grad_(),
        bias.to(device, bias_dtype or dtype).requires_grad_(),
    )


def assert_near(got, want, dtype, what=""):
    """got (any dtype) against a float64 want, within TOLERANCE[dtype] of want's largest magnitude."""
    assert torch.isfinite(got).all(), what
    tol = TOLERANCE[dtype] * max(1.0, want.abs().max().item())
    got, want = got.double().cpu(), want.double().cpu()
    torch.testing.assert_close(got, want, rtol=0, atol=tol, msg=lambda m: f"{what}: {m}")


def reference(inputs, grad_y):
    """z, y and the gradients of (x, weight, bias) in float64."""
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    z = torch.nn.functional.linear(*leaves)
    y = linear_gelu_reference(*leaves)
    return z.detach(), y, torch.autograd.grad(y, leaves, grad_y.double())


def test_reference_is_exact_erf_gelu():
    x, w, b = (t.detach().double() for t in make_inputs(5, 8, 6))
    z = x @ w.T + b
    want = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
    torch.testing.assert_close(linear_gelu_reference(x, w, b), want, rtol=1e-14, atol=1e-14)


def test_reference_gradcheck():
    inputs = [t.detach().double().requires_grad_() for t in make_inputs(4, 5, 3)]
    assert torch.autograd.gradcheck(linear_gelu_reference, inputs)


def test_cpu_dispatch_runs_the_reference():
    x, w, b = make_inputs(6, 10, 7, torch.float64)
    y = linear_gelu(x, w, b)
    torch.testing.assert_close(y, linear_gelu_reference(x, w, b), rtol=0, atol=0)
    y.sum().backward()
    assert x.grad is not None and w.grad is not None and b.grad is not None


def test_autocast_casts_inputs():
    x, w, b = make_inputs(4, 16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear_gelu(x, w, b)
    assert y.dtype == torch.bfloat16
    want = linear_gelu_reference(*(t.detach().to(torch.bfloat16).double() for t in (x, w, b)))
    assert_near(y, want, torch.bfloat16, "autocast")


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
# Edges in every dimension: one row, K and N not multiples of the tiles, several row groups (GROUP_M).
@pytest.mark.parametrize("T, K, N", [(1, 16, 16), (37, 40, 50), (70, 32, 24)])
def test_kernel_matches_reference(T, K, N, dtype):
    inputs = make_inputs(T, K, N, dtype, bias_dtype=torch.float32, device=KERNEL_DEVICE, seed=T + K + N)
    grad_y = torch.randn(T, N, generator=torch.Generator().manual_seed(1)).to(KERNEL_DEVICE, dtype)
    y, z = fused_op(*inputs, True)
    assert y.dtype == z.dtype == dtype and not z.requires_grad
    grads = torch.autograd.grad(y, inputs, grad_y)
    want_z, want_y, want_grads = reference(inputs, grad_y)
    assert_near(z, want_z, dtype, "z")
    assert_near(y, want_y, dtype, "y")
    for name, got, want, leaf in zip(["x", "weight", "bias"], grads, want_grads, inputs, strict=True):
        assert got.dtype == leaf.dtype, name
        assert_near(got, want, dtype, f"grad {name}")


@needs_kernels
def test_kernel_large_preactivations():
    """GELU's tails: ~identity for large z, ~0 (no NaN from exp or erf) for very negative z."""
    x = torch.tensor([[1.0], [-1.0]], device=KERNEL_DEVICE).repeat(8, 16)
    w = torch.full((16, 16), 3.0, device=KERNEL_DEVICE)
    b = torch.zeros(16, device=KERNEL_DEVICE)
    y, z = linear_gelu_forward(x, w, b, True)
    assert (z.abs() == 48).all()
    torch.testing.assert_close(y, torch.where(z > 0, z, 0.0), rtol=0, atol=1e-6)
    dz, db = gelu_backward(torch.ones_like(z), z)
    torch.testing.assert_close(dz, (z > 0).float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(db, torch.full((16,), 8.0, device=KERNEL_DEVICE), rtol=0, atol=1e-5)


@needs_kernels
def test_kernel_gelu_backward_partial_sums():
    """Several row programs (one column block): the bias gradient adds their partial sums."""
    gen = torch.Generator().manual_seed(3)
    z, grad_y = (torch.randn(45, 16, generator=gen, dtype=torch.float64) * 2 for _ in range(2))
    dz, db = gelu_backward(grad_y.float().to(KERNEL_DEVICE), z.float().to(KERNEL_DEVICE))
    zz = z.clone().requires_grad_()
    (want,) = torch.autograd.grad(torch.nn.functional.gelu(zz), zz, grad_y)
    assert_near(dz, want, torch.float32, "dz")
    assert_near(db, want.sum(0), torch.float32, "db")


@needs_kernels
def test_kernel_strided_inputs_and_partial_grads():
    """A row-strided x and a transposed-view weight; only weight and bias require grad."""
    x_wide, w_t, b = make_inputs(20, 48, 32, device=KERNEL_DEVICE)
    x = x_wide.detach()[:, :24]
    w = w_t.detach()[:, :24].t().contiguous().t().requires_grad_()  # (32, 24) with stride (1, 32)
    assert w.stride(1) != 1
    grad_y = torch.randn(20, 32, device=KERNEL_DEVICE)
    y, _ = fused_op(x, w, b, True)
    dw, db = torch.autograd.grad(y, [w, b], grad_y)
    _, want_y, (_, want_dw, want_db) = reference([x, w, b], grad_y)
    assert_near(y, want_y, torch.float32, "y")
    assert_near(dw, want_dw, torch.float32, "grad weight")
    assert_near(db, want_db, torch.float32, "grad bias")


@needs_kernels
def test_kernel_without_saved_preactivation():
    x, w, b = make_inputs(8, 16, 16, device=KERNEL_DEVICE)
    y, z = fused_op(x, w, b, False)
    assert z.numel() == 0
    assert_near(y, reference([x, w, b], torch.zeros(8, 16, device=KERNEL_DEVICE))[1], torch.float32, "y")
    with pytest.raises(RuntimeError, match="save_preactivation=False"):
        y.sum().backward()


@needs_kernels
def test_kernel_no_rows():
    x, w, b = (t.detach() for t in make_inputs(0, 16, 8, device=KERNEL_DEVICE))
    y, z = linear_gelu_forward(x, w, b, True)
    assert y.shape == z.shape == (0, 8)
    dz, db = gelu_backward(y, z)
    assert dz.shape == (0, 8) and db.shape == (8,) and not db.any()


@needs_kernels
def test_opcheck():
    torch.library.opcheck(fused_op, (*make_inputs(16, 16, 16, device=KERNEL_DEVICE), True))


def test_bad_inputs():
    x, w, b = (t.detach() for t in make_inputs(4, 8, 6))
    with pytest.raises(ValueError, match="x must be a \\(T, K\\) tensor"):
        linear_gelu(x[None], w, b)
    with pytest.raises(ValueError, match="weight must be an \\(N, 8\\) tensor"):
        linear_gelu(x, w.T, b)
    with pytest.raises(ValueError, match="bias must be a \\(6,\\) tensor"):
        linear_gelu(x, w, b[:3])
    with pytest.raises(ValueError, match="bias must be a \\(6,\\) tensor"):
        linear_gelu(x, w, None)
    with pytest.raises(ValueError, match="weight device meta != x device cpu"):
        linear_gelu(x, w.to("meta"), b)
    with pytest.raises(TypeError, match="weight dtype torch.float16 != x dtype torch.float32"):
        linear_gelu(x, w.half(), b)
    with pytest.raises(TypeError, match="x dtype torch.int64 not supported"):
        linear_gelu(x.long(), w.long(), b)
    with pytest.raises(TypeError, match="bias must be a floating-point tensor"):
        linear_gelu(x, w, b.long())
    with pytest.raises(TypeError, match="x dtype torch.float64 not supported"):
        _check_inputs(x.double(), w.double(), b, triton_path=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
# ViT-B's fc1, and ragged sizes that leave partial tiles in every dimension.
@pytest.mark.parametrize("T, K, N", [(2048, 768, 3072), (1000, 100, 300)])
def test_cuda_matches_fp64_and_eager_error(T, K, N, dtype):
    """16-bit fused GEMM + GELU: no further from fp64 than eager linear then GELU in the same dtype."""
    inputs = make_inputs(T, K, N, dtype, device="cuda", seed=K)
    grad_y = torch.randn(T, N, device="cuda", dtype=dtype)
    y = linear_gelu(*inputs)
    grads = torch.autograd.grad(y, inputs, grad_y)
    eager = linear_gelu_reference(*inputs)
    eager_grads = torch.autograd.grad(eager, inputs, grad_y)
    _, want_y, want_grads = reference(inputs, grad_y)
    for name, got, base, want in zip(
        ["y", "x", "weight", "bias"], (y, *grads), (eager, *eager_grads), (want_y, *want_grads), strict=True
    ):
        err, base_err = ((t.double() - want).norm() / want.norm() for t in (got, base))
        assert err <= 1.5 * base_err + 1e-6, f"{name}: {err:.2e} vs eager {base_err:.2e}"


@pytest.mark.cuda
def test_cuda_fp32_compile_and_no_grad():
    x, w, b = make_inputs(300, 64, 200, device="cuda")
    _, want_y, _ = reference([x, w, b], torch.zeros(300, 200, device="cuda"))
    with torch.no_grad():
        assert_near(linear_gelu(x, w, b), want_y, torch.float32, "fp32")
    inputs = make_inputs(256, 768, 3072, torch.bfloat16, device="cuda")
    compiled = torch.compile(linear_gelu, fullgraph=True)
    y = compiled(*inputs)
    torch.testing.assert_close(y, linear_gelu(*inputs), rtol=0, atol=0)
    y.float().sum().backward()
    assert all(t.grad is not None for t in inputs)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert linear_gelu(x, w, b).dtype == torch.bfloat16
