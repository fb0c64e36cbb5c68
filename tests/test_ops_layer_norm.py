import os

import pytest
import torch

from shapkern.kernels.layer_norm import layer_norm_backward, layer_norm_forward
from shapkern.ops.layer_norm import (
    _check_inputs,
    add_layer_norm,
    add_layer_norm_reference,
    layer_norm,
    layer_norm_reference,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter runs Triton kernels on CPU tensors.
KERNEL_DEVICE = "cpu" if INTERPRET else "cuda"
needs_kernels = pytest.mark.skipif(
    not (INTERPRET or torch.cuda.is_available()),
    reason="Triton kernels need TRITON_INTERPRET=1 or a CUDA GPU",
)
fused_op = torch.ops.shapkern.add_layer_norm_fwd
# Error allowed against float64, relative to the largest magnitude of the expected tensor.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_inputs(T, D, dtype=torch.float32, y_dtype=None, layer_scale=True, device="cpu", seed=0):
    """x, y (T, D) and weight, bias, layer_scale (D,) fp32 (None without LayerScale), all requiring grad."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0, dtype=torch.float32):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(device, dtype)

    tensors = [
        rand(T, D, shift=0.5, dtype=dtype),  # a mean away from 0 tests the centring
        rand(T, D, scale=2.0, dtype=y_dtype or dtype),
        rand(D, scale=0.5, shift=1.0),
        rand(D, scale=0.5),
        rand(D, scale=0.3) if layer_scale else None,
    ]
    return [None if t is None else t.requires_grad_() for t in tensors]


def assert_near(got, want, dtype, what=""):
    """got (any dtype) against a float64 want, within TOLERANCE[dtype] of want's largest magnitude."""
    assert torch.isfinite(got).all(), what
    tol = TOLERANCE[dtype] * max(1.0, want.abs().max().item())
    got, want = got.double().cpu(), want.double().cpu()
    torch.testing.assert_close(got, want, rtol=0, atol=tol, msg=lambda m: f"{what}: {m}")


def reference_grads(inputs, grad_s, grad_h, eps):
    """s, h and the gradients of (x, y, weight, bias[, layer_scale]) in float64 through the reference."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    s, h = add_layer_norm_reference(*leaves[:4], eps, leaves[4])
    grads = torch.autograd.grad(
        [s, h], [t for t in leaves if t is not None], [grad_s.double(), grad_h.double()]
    )
    return s, h, grads


def test_reference_matches_formula():
    x, y, w, b, g = (t.detach().double() for t in make_inputs(5, 12))
    s, h = add_layer_norm_reference(x, y, w, b, 1e-6, g)
    torch.testing.assert_close(s, x + g * y, rtol=0, atol=0)
    centred = s - s.mean(-1, keepdim=True)
    want = centred / (centred.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * w + b
    torch.testing.assert_close(h, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer_norm_reference(s, w, b, 1e-6), want, rtol=1e-12, atol=1e-12)


def test_reference_dtypes():
    x, y, w, b, g = (t.detach() for t in make_inputs(3, 8, torch.float32, y_dtype=torch.bfloat16))
    s, h = add_layer_norm_reference(x, y, w, b, 1e-6, g, out_dtype=torch.bfloat16)
    # An fp32 residual stream stays fp32 whatever the branch's dtype; h takes out_dtype.
    assert s.dtype == torch.float32 and h.dtype == torch.bfloat16
    s, h = add_layer_norm_reference(y, y, w, b, 1e-6, g)
    assert s.dtype == h.dtype == torch.bfloat16  # the fp32 LayerScale does not promote s


@pytest.mark.parametrize("layer_scale", [True, False])
def test_reference_gradcheck(layer_scale):
    inputs = [
        None if t is None else t.detach().double().requires_grad_()
        for t in make_inputs(4, 6, layer_scale=layer_scale)
    ]

    def fn(x, y, w, b, *g):
        return add_layer_norm_reference(x, y, w, b, 1e-5, *g)

    assert torch.autograd.gradcheck(fn, [t for t in inputs if t is not None])
    assert torch.autograd.gradcheck(
        lambda x, w, b: layer_norm_reference(x, w, b, 1e-5), [inputs[0], *inputs[2:4]]
    )


def test_cpu_dispatch_runs_the_reference():
    x, y, w, b, g = make_inputs(6, 10, torch.float64)
    s, h = add_layer_norm(x, y, w.double(), b.double(), 1e-6, g)
    want_s, want_h = add_layer_norm_reference(x, y, w.double(), b.double(), 1e-6, g)
    torch.testing.assert_close((s, h), (want_s, want_h), rtol=0, atol=0)
    (s.sum() + h.pow(2).sum()).backward()  # differentiable on the reference path
    assert x.grad is not None and g.grad is not None
    torch.testing.assert_close(layer_norm(x, w, b, 1e-6), layer_norm_reference(x, w, b, 1e-6), rtol=0, atol=0)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layer_scale", [True, False])
# (7, 40): several rows per program and a padded D; (33, 96): the last row block half empty.
@pytest.mark.parametrize("T, D", [(1, 8), (7, 40), (33, 96)])
def test_kernel_matches_reference(T, D, dtype, layer_scale):
    inputs = make_inputs(T, D, dtype, layer_scale=layer_scale, device=KERNEL_DEVICE, seed=T + D)
    grad_s, grad_h = (
        torch.randn(T, D, generator=torch.Generator().manual_seed(i)).to(KERNEL_DEVICE, dtype) for i in (1, 2)
    )
    s, h, mean, rstd = fused_op(*inputs[:4], inputs[4], 1e-5, None)
    assert s.dtype == h.dtype == dtype and mean.shape == rstd.shape == (T,)
    assert not mean.requires_grad and not rstd.requires_grad
    leaves = [t for t in inputs if t is not None]
    grads = torch.autograd.grad([s, h], leaves, [grad_s, grad_h])
    want_s, want_h, want_grads = reference_grads(inputs, grad_s, grad_h, 1e-5)
    assert_near(s, want_s, dtype, "s")
    assert_near(h, want_h, dtype, "h")
    names = ["x", "y", "weight", "bias", "layer_scale"][: len(leaves)]
    for name, got, want, leaf in zip(names, grads, want_grads, leaves, strict=True):
        assert got.dtype == leaf.dtype, name
        assert_near(got, want, dtype, f"grad {name}")


@needs_kernels
def test_kernel_normalises_the_rounded_sum():
    """h is LayerNorm of the s it returns (rounded to fp16), as the unfused add then LayerNorm computes it."""
    x, y, w, b, g = (t.detach() for t in make_inputs(9, 24, torch.float16, device=KERNEL_DEVICE))
    s, h, _, _ = fused_op(x, y, w, b, g, 1e-5, None)
    want = layer_norm_reference(s.double(), w.double(), b.double(), 1e-5)
    torch.testing.assert_close(h.double(), want, rtol=0, atol=1e-3 * want.abs().max().item())


@needs_kernels
def test_kernel_mixed_dtypes():
    """Autocast's layout: fp32 residual stream, fp16 branch, fp16 h; grad_y is written apart from grad_x."""
    T, D = 6, 32
    inputs = make_inputs(T, D, torch.float32, y_dtype=torch.float16, layer_scale=False, device=KERNEL_DEVICE)
    grad_s = torch.randn(T, D, device=KERNEL_DEVICE)
    grad_h = torch.randn(T, D, device=KERNEL_DEVICE, dtype=torch.float16)
    s, h, _, _ = fused_op(*inputs[:4], None, 1e-5, torch.float16)
    assert s.dtype == torch.float32 and h.dtype == torch.float16
    grads = torch.autograd.grad([s, h], inputs[:4], [grad_s, grad_h])
    want_s, want_h, want_grads = reference_grads(inputs, grad_s, grad_h, 1e-5)
    assert_near(s, want_s, torch.float32, "s")
    assert_near(h, want_h, torch.float16, "h")
    assert [t.dtype for t in grads] == [torch.float32, torch.float16, torch.float32, torch.float32]
    for name, got, want in zip(["x", "y", "weight", "bias"], grads, want_grads, strict=True):
        assert_near(got, want, torch.float16, f"grad {name}")


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_plain_layer_norm(dtype):
    x, _, w, b, _ = make_inputs(11, 48, dtype, device=KERNEL_DEVICE)
    s, h, _, _ = fused_op(x, None, w, b, None, 1e-6, None)
    assert s.numel() == 0 and h.dtype == dtype
    grad_h = torch.randn(11, 48, device=KERNEL_DEVICE).to(dtype)
    grads = torch.autograd.grad(h, [x, w, b], grad_h)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    want = layer_norm_reference(*leaves, 1e-6)
    want_grads = torch.autograd.grad(want, leaves, grad_h.double())
    assert_near(h, want, dtype, "h")
    for name, got, expected in zip(["x", "weight", "bias"], grads, want_grads, strict=True):
        assert_near(got, expected, dtype, f"grad {name}")


@needs_kernels
def test_kernel_strided_rows_and_unused_s():
    """Rows of a wider tensor (row stride > D) are read in place; a backward from h alone is correct."""
    T, D = 5, 16
    wide = make_inputs(T, 2 * D, device=KERNEL_DEVICE)
    x, y = (t[:, :D] for t in wide[:2])
    _, _, w, b, g = make_inputs(T, D, device=KERNEL_DEVICE)
    _, h, _, _ = fused_op(x, y, w, b, g, 1e-5, None)
    grad_h = torch.randn(T, D, device=KERNEL_DEVICE)
    grads = torch.autograd.grad(h, [x, y, w, b, g], grad_h)
    _, want_h, want_grads = reference_grads([x, y, w, b, g], torch.zeros_like(grad_h), grad_h, 1e-5)
    assert_near(h, want_h, torch.float32, "h")
    for name, got, want in zip(["x", "y", "weight", "bias", "layer_scale"], grads, want_grads, strict=True):
        assert_near(got, want, torch.float32, f"grad {name}")


@needs_kernels
def test_kernel_no_rows():
    x, y, w, b, g = (t.detach() for t in make_inputs(0, 8, device=KERNEL_DEVICE))
    s, h, mean, rstd = layer_norm_forward(x, y, w, b, g, 1e-5, None)
    assert s.shape == h.shape == (0, 8) and mean.shape == (0,)
    dx, dy, dw, db, dg = layer_norm_backward(s, h, s, y, w, g, mean, rstd, x.dtype, y.dtype)
    assert dx.shape == dy.shape == (0, 8)
    assert all(t.shape == (8,) and not t.any() for t in (dw, db, dg))


@needs_kernels
def test_opcheck():
    x, y, w, b, g = make_inputs(4, 16, device=KERNEL_DEVICE)
    torch.library.opcheck(fused_op, (x, y, w, b, g, 1e-5, None))
    torch.library.opcheck(fused_op, (x, None, w, b, None, 1e-5, torch.float16))


def test_bad_inputs():
    x, y, w, b, g = (t.detach() for t in make_inputs(4, 8))
    with pytest.raises(ValueError, match="x must be a \\(T, D\\) tensor"):
        add_layer_norm(x[None], y, w, b, 1e-5)
    with pytest.raises(ValueError, match="y must have x's shape"):
        add_layer_norm(x, y[:, :4], w, b, 1e-5)
    with pytest.raises(ValueError, match="weight must be a \\(8,\\) tensor"):
        add_layer_norm(x, y, w[:4], b, 1e-5)
    with pytest.raises(ValueError, match="bias must be a \\(8,\\) tensor"):
        layer_norm(x, w, None, 1e-5)
    with pytest.raises(ValueError, match="layer_scale must be a \\(8,\\) tensor"):
        add_layer_norm(x, y, w, b, 1e-5, g[None])
    with pytest.raises(TypeError, match="x dtype torch.int64 not supported"):
        add_layer_norm(x.long(), y, w, b, 1e-5)
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        add_layer_norm(x, y, w.long(), b, 1e-5)
    with pytest.raises(ValueError, match="bias device meta != x device cpu"):
        add_layer_norm(x, y, w, b.to("meta"), 1e-5)
    with pytest.raises(ValueError, match="y device meta != x device cpu"):
        add_layer_norm(x, y.to("meta"), w, b, 1e-5)
    with pytest.raises(ValueError, match="eps must be a positive float"):
        add_layer_norm(x, y, w, b, 0.0)
    with pytest.raises(TypeError, match="out_dtype must be None or one of"):
        add_layer_norm(x, y, w, b, 1e-5, out_dtype=torch.int32)
    # The Triton path takes no float64 and at most MAX_D channels.
    with pytest.raises(TypeError, match="x dtype torch.float64 not supported"):
        _check_inputs("add_layer_norm", x.double(), y, w, b, None, 1e-5, None, triton_path=True)
    wide = torch.zeros(1, 32768)
    with pytest.raises(ValueError, match="above the kernel's limit"):
        _check_inputs("layer_norm", wide, None, wide[0], wide[0], None, 1e-5, None, triton_path=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [384, 768])
def test_cuda_matches_fp32_and_eager_error(dtype, D):
    """bf16/fp16 at ViT widths: no further from fp64 than the unfused eager ops in the same dtype."""
    T = 4099
    inputs = make_inputs(T, D, dtype, device="cuda", seed=D)
    grad_s, grad_h = (torch.randn(T, D, device="cuda", dtype=dtype) for _ in range(2))
    s, h = add_layer_norm(*inputs[:4], 1e-6, inputs[4])
    grads = torch.autograd.grad([s, h], inputs, [grad_s, grad_h])
    eager = add_layer_norm_reference(*inputs[:4], 1e-6, inputs[4])
    eager_grads = torch.autograd.grad(eager, inputs, [grad_s, grad_h])
    want_s, want_h, want_grads = reference_grads(inputs, grad_s, grad_h, 1e-6)
    for name, got, base, want in zip(
        ["s", "h", "x", "y", "weight", "bias", "layer_scale"],
        (s, h, *grads),
        (*eager, *eager_grads),
        (want_s, want_h, *want_grads),
        strict=True,
    ):
        err, base_err = ((t.double() - want).norm() / want.norm() for t in (got, base))
        assert err <= 1.5 * base_err + 1e-6, f"{name}: {err:.2e} vs eager {base_err:.2e}"


@pytest.mark.cuda
def test_cuda_compiles_and_layer_norm():
    inputs = make_inputs(256, 768, torch.bfloat16, device="cuda")
    compiled = torch.compile(lambda x, y, w, b, g: add_layer_norm(x, y, w, b, 1e-6, g), fullgraph=True)
    s, h = compiled(*inputs)
    want_s, want_h = add_layer_norm(*inputs[:4], 1e-6, inputs[4])
    torch.testing.assert_close((s, h), (want_s, want_h), rtol=0, atol=0)
    h.float().sum().backward()
    assert all(t.grad is not None for t in inputs)
    x, _, w, b, _ = inputs
    out = layer_norm(x, w, b, 1e-6, out_dtype=torch.float32)
    assert_near(
        out, layer_norm_reference(x.double(), w.double(), b.double(), 1e-6), torch.bfloat16, "layer_norm"
    )
