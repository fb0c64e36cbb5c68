"""fp8 (e4m3) linear op: quantisation (reference and Triton kernel), the rowwise-scaled GEMM against its
reference and against the exact product within a derived bound, forward-only errors, bad inputs."""

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from shapkern.kernels.fp8 import quantize_rows_forward
from shapkern.ops import (
    add_layer_norm_quantize,
    check_fp8_device,
    fp8_linear,
    layer_norm_quantize,
    quantize_rows,
    quantize_weight,
    supports_fp8,
)
from shapkern.ops.fp8_linear import FORWARD_ONLY
from shapkern.ops.fp8_reference import (
    AMAX_FLOOR,
    E4M3_MAX,
    FP8,
    add_layer_norm_quantize_reference,
    fp8_linear_reference,
    layer_norm_quantize_reference,
    quantize_rows_reference,
)

# The module, not the op of the same name that shapkern.ops exports.
fp8_ops = importlib.import_module("shapkern.ops.fp8_linear")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter runs Triton kernels on CPU tensors.
KERNEL_DEVICE = "cpu" if INTERPRET else "cuda"
needs_kernels = pytest.mark.skipif(
    not (INTERPRET or torch.cuda.is_available()),
    reason="Triton kernels need TRITON_INTERPRET=1 or a CUDA GPU",
)
# Smallest normal e4m3 value: the interpreter's fp32 -> fp8 cast makes no subnormals (see kernels/fp8.py).
MIN_NORMAL = 2.0**-6


def rand(*shape, dtype=torch.float32, scale=1.0, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)


def dequantize(q, scale):
    return q.float() * scale


def e4m3_step(v):
    """The spacing of e4m3 values at |v| (fp32 v in the quantised domain, |v| <= 448)."""
    exponent = torch.floor(torch.log2(v.abs().clamp(min=2.0**-9)))
    return torch.exp2(exponent.clamp(min=-6) - 3)


# -- quantisation: the reference ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_round_trip_and_scales(dtype):
    x = rand(33, 96, dtype=dtype, scale=3.0)
    x[5] = 0  # a row of zeros
    q, scale = quantize_rows_reference(x)
    assert q.dtype == FP8 and q.shape == x.shape and scale.shape == (33, 1) and scale.dtype == torch.float32
    amax = x.float().abs().amax(1, keepdim=True)
    expected = torch.where(amax > 0, amax, torch.full_like(amax, AMAX_FLOOR)) / E4M3_MAX
    torch.testing.assert_close(scale, expected, rtol=0, atol=0)
    # The largest element of every row maps to ±448 and comes back exactly.
    assert (q.float().abs().amax(1) == E4M3_MAX)[amax.squeeze(1) > 0].all()
    assert not q[5].float().any()
    # Round to nearest: each element is within half an e4m3 step of x (relative 2^-4 for normals).
    v = x.float() / scale
    err = (q.float() - v).abs()
    assert (err <= e4m3_step(v) / 2 * (1 + 1e-6)).all()
    assert (dequantize(q, scale) - x.float()).abs().max() <= amax.max() * 2.0**-4


def test_reference_rounds_to_nearest_even_like_torch():
    # amax 448 gives scale 1: the values are the quantised values themselves.
    row = torch.tensor([[448.0, 17.0, 19.0, 1.0625, 1.1875, 15.5, 0.0029296875, -17.0, -448.0]])
    q, scale = quantize_rows_reference(row)
    assert scale.item() == 1.0
    # Ties go to the even mantissa (17 -> 16, 19 -> 20, 15.5 -> 16 carries into the exponent);
    # 0.0029296875 = 1.5 * 2^-9 is a subnormal tie (-> 2^-8).
    want = torch.tensor([[448.0, 16.0, 20.0, 1.0, 1.25, 16.0, 0.00390625, -16.0, -448.0]])
    torch.testing.assert_close(q.float(), want, rtol=0, atol=0)
    torch.testing.assert_close(q.float(), row.to(FP8).float(), rtol=0, atol=0)


def test_quantize_weight_per_output_channel():
    weight = rand(48, 32, scale=0.02)
    weight[3] *= 100  # one channel far larger: its scale must not touch the others
    q, scale = quantize_weight(weight)
    assert q.dtype == FP8 and q.shape == (48, 32) and scale.shape == (1, 48) and scale.is_contiguous()
    torch.testing.assert_close(scale, weight.abs().amax(1)[None] / E4M3_MAX, rtol=0, atol=0)
    rel = (dequantize(q, scale.t()) - weight).abs() / weight.abs().amax(1, keepdim=True)
    assert rel.max() <= 2.0**-4
    with torch.enable_grad():
        assert not quantize_weight(weight.requires_grad_())[0].requires_grad


# -- quantisation: the Triton kernel -----------------------------------------------------------


def assert_quantized_equal(q, scale, q_ref, scale_ref, *, interpreter: bool = INTERPRET):
    """Bitwise equal scales and e4m3 values (values equal as numbers: -0 == 0); in the interpreter only
    where the value is a normal e4m3 number (its fp8 cast makes no subnormals)."""
    torch.testing.assert_close(scale.cpu(), scale_ref.cpu(), rtol=0, atol=0)
    got, want = q.float().cpu(), q_ref.float().cpu()
    checked = (
        (want.abs() >= MIN_NORMAL) | (want == 0) if interpreter else torch.ones_like(want, dtype=torch.bool)
    )
    assert checked.float().mean() > 0.9
    torch.testing.assert_close(got[checked], want[checked], rtol=0, atol=0)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T, K", [(1, 16), (9, 40), (33, 64)])
def test_kernel_quantize_matches_reference(T, K, dtype):
    x = rand(T, K, dtype=dtype, scale=3.0, device=KERNEL_DEVICE)
    x[0, :3] = 0
    s, q, scale = quantize_rows_forward(x, None, None, None, None, 0.0, "none", None, AMAX_FLOOR)
    assert s is None and q.dtype == FP8 and scale.shape == (T, 1)
    assert_quantized_equal(q, scale, *quantize_rows_reference(x))


@needs_kernels
def test_kernel_rounds_ties_to_even_and_zero_rows():
    row = torch.tensor([[448.0, 17.0, 19.0, 1.0625, 1.1875, 15.5, 0.5, -17.0, -448.0]])
    x = torch.cat([row, torch.zeros_like(row)]).to(KERNEL_DEVICE)
    _, q, scale = quantize_rows_forward(x, None, None, None, None, 0.0, "none", None, AMAX_FLOOR)
    want = torch.tensor([[448.0, 16.0, 20.0, 1.0, 1.25, 16.0, 0.5, -16.0, -448.0], [0.0] * 9])
    torch.testing.assert_close(q.float().cpu(), want, rtol=0, atol=0)
    assert scale[0].item() == 1.0 and scale[1].item() == (torch.tensor(AMAX_FLOOR) / E4M3_MAX).item()


def within_one_step(q, scale, q_ref, scale_ref, share: float):
    """Fused prologues compute the activation in a different fp32 order than the reference, so an
    element on a rounding boundary may land one e4m3 step away; all others must be equal."""
    torch.testing.assert_close(scale.cpu(), scale_ref.cpu(), rtol=1e-5, atol=0)
    got, want = q.float().cpu(), q_ref.float().cpu()
    checked = (want.abs() >= MIN_NORMAL) if INTERPRET else torch.ones_like(want, dtype=torch.bool)
    diff = (got - want).abs()[checked]
    assert (diff <= e4m3_step(want)[checked] * 1.001).all()
    assert (diff == 0).float().mean() >= share


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_gelu_prologue(dtype):
    z = rand(17, 64, dtype=dtype, scale=2.0, device=KERNEL_DEVICE)
    _, q, scale = quantize_rows_forward(z, None, None, None, None, 0.0, "gelu", None, AMAX_FLOOR)
    within_one_step(q, scale, *quantize_rows_reference(F.gelu(z.float())), share=0.98)


@needs_kernels
@pytest.mark.parametrize("residual, layer_scale", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float32, torch.float16)])
def test_kernel_layer_norm_prologue(residual, layer_scale, dtypes):
    x = (rand(13, 48, dtype=dtypes[0], seed=1, device=KERNEL_DEVICE) + 0.5).to(dtypes[0])
    y = rand(13, 48, dtype=dtypes[1], scale=2.0, seed=2, device=KERNEL_DEVICE) if residual else None
    w, b = rand(48, seed=3, device=KERNEL_DEVICE) * 0.5 + 1, rand(48, seed=4, device=KERNEL_DEVICE) * 0.5
    g = rand(48, seed=5, device=KERNEL_DEVICE) * 0.3 if layer_scale else None
    s_dtype = torch.promote_types(*dtypes)
    s, q, scale = quantize_rows_forward(x, y, w, b, g, 1e-6, "layer_norm", s_dtype, AMAX_FLOOR)
    if residual:
        s_ref, *quantized = add_layer_norm_quantize_reference(x, y, w, b, 1e-6, g)
        assert s.dtype == s_dtype
        torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=1e-6)
    else:
        assert s is None
        quantized = layer_norm_quantize_reference(x, w, b, 1e-6)
    within_one_step(q, scale, *quantized, share=0.98)


@needs_kernels
def test_kernel_strided_rows_and_no_rows():
    x = rand(8, 64, device=KERNEL_DEVICE)[:, :32]  # row stride 64
    _, q, scale = quantize_rows_forward(x, None, None, None, None, 0.0, "none", None, AMAX_FLOOR)
    assert_quantized_equal(q, scale, *quantize_rows_reference(x))
    s, q, scale = quantize_rows_forward(
        x[:0], x[:0], None, None, None, 0.0, "none", torch.float32, AMAX_FLOOR
    )
    assert s.shape == q.shape == (0, 32) and scale.shape == (0, 1)


@needs_kernels
def test_opcheck():
    x = rand(4, 16, device=KERNEL_DEVICE)
    w, b = torch.ones(16, device=KERNEL_DEVICE), torch.zeros(16, device=KERNEL_DEVICE)
    op = torch.ops.shapkern.fp8_quantize_rows
    torch.library.opcheck(op, (x, None, None, None, None, 0.0, "gelu", None))
    torch.library.opcheck(op, (x, x.half(), w, b, w, 1e-5, "layer_norm", torch.float32))


def test_cpu_dispatch_runs_the_references():
    x, y = rand(6, 32), rand(6, 32, seed=1)
    w, b, g = rand(32, seed=2), rand(32, seed=3), rand(32, seed=4)
    for got, want in (
        (quantize_rows(x), quantize_rows_reference(x)),
        (quantize_rows(x, gelu=True), quantize_rows_reference(F.gelu(x))),
        (layer_norm_quantize(x, w, b, 1e-5), layer_norm_quantize_reference(x, w, b, 1e-5)),
        (
            add_layer_norm_quantize(x, y, w, b, 1e-5, g),
            add_layer_norm_quantize_reference(x, y, w, b, 1e-5, g),
        ),
    ):
        for a, c in zip(got, want, strict=True):
            torch.testing.assert_close(a.float(), c.float(), rtol=0, atol=0)


# -- the GEMM ----------------------------------------------------------------------------------


def linear_inputs(T=40, K=64, N=48, seed=0):
    x = rand(T, K, seed=seed, scale=2.0)
    weight, bias = rand(N, K, seed=seed + 1, scale=0.1), rand(N, seed=seed + 2)
    return x, weight, bias


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("prequantized", [False, True])
def test_fp8_linear_matches_reference(out_dtype, with_bias, prequantized):
    x, weight, bias = linear_inputs()
    bias = bias if with_bias else None
    w8, ws = quantize_weight(weight)
    x_scale = None
    if prequantized:
        x, x_scale = quantize_rows(x)
    got = fp8_linear(x, w8, ws, bias, out_dtype=out_dtype, x_scale=x_scale)
    want = fp8_linear_reference(x, w8, ws, bias, out_dtype=out_dtype, x_scale=x_scale)
    assert got.dtype == want.dtype == out_dtype and got.shape == (40, 48)
    # fp32 accumulation in both; a 16-bit output may round the same fp32 value one step apart.
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[out_dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=1e-4)


def test_fp8_linear_without_cpu_scaled_mm_runs_the_reference(monkeypatch):
    x, weight, bias = linear_inputs()
    w8, ws = quantize_weight(weight)
    monkeypatch.setattr(fp8_ops, "_cpu_scaled_mm", lambda: False)
    got = fp8_linear(x, w8, ws, bias)
    torch.testing.assert_close(got, fp8_linear_reference(x, w8, ws, bias), rtol=0, atol=0)


def test_reference_multiplies_in_fp32_under_autocast():
    x, weight, bias = linear_inputs()
    w8, ws = quantize_weight(weight)
    want = fp8_linear_reference(x, w8, ws, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fp8_linear_reference(x, w8, ws, bias)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_cpu_scaled_mm_probe_matches_the_torch_build():
    # torch 2.14's CPU _scaled_mm takes rowwise scales; the probe must say so rather than hide it.
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    if (major, minor) >= (2, 14):
        assert fp8_ops._cpu_scaled_mm()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fp8_linear_error_within_the_quantisation_bound(seed):
    """|ŷ - y| <= Σ_k |x̂_k ŵ_k - x_k w_k| elementwise, with |x̂ - x| <= 2^-4 |x| + 2^-10 s_x (half an
    e4m3 step: relative 2^-4 for normals, 2^-9 s / 2 among the subnormals) and likewise for w."""
    x, weight, bias = linear_inputs(seed=seed)
    w8, ws = quantize_weight(weight)
    got = fp8_linear(x, w8, ws, bias).double()
    exact = F.linear(x.double(), weight.double(), bias.double())
    _, x_scale = quantize_rows_reference(x)
    dx = x.abs().double() * 2**-4 + x_scale.double() * 2**-10
    dw = weight.abs().double() * 2**-4 + ws.t().double() * 2**-10
    bound = dx @ weight.abs().double().t() + x.abs().double() @ dw.t() + dx @ dw.t()
    assert ((got - exact).abs() <= bound + 1e-4).all()
    # Typical errors are far inside the bound: rounding errors of random sign average out.
    assert (got - exact).norm() / exact.norm() < 0.05


def test_forward_only():
    x, weight, bias = linear_inputs()
    w8, ws = quantize_weight(weight)
    with pytest.raises(RuntimeError, match="forward-only; use precision='auto'"):
        fp8_linear(x.requires_grad_(), w8, ws, bias)
    with pytest.raises(RuntimeError, match="forward-only"):
        fp8_linear(x.detach(), w8, ws, bias.requires_grad_())
    with pytest.raises(RuntimeError, match="forward-only"):
        quantize_rows(x)
    with pytest.raises(RuntimeError, match="forward-only"):
        layer_norm_quantize(x.detach(), torch.ones(64, requires_grad=True), torch.zeros(64), 1e-5)
    with torch.no_grad():
        assert not fp8_linear(x, w8, ws, bias).requires_grad
    assert FORWARD_ONLY.startswith("fp8 evaluation is forward-only")


def test_supports_fp8_and_old_gpus(monkeypatch):
    assert supports_fp8("cpu") and not supports_fp8("meta")
    with pytest.raises(RuntimeError, match="compute capability 8.9 or newer.*got device meta"):
        check_fp8_device("meta")
    # The quantisation ops check too, before a Triton fp8 kernel could meet a GPU without e4m3.
    x = torch.empty(4, 16, device="meta")
    for op in (quantize_rows, lambda x: layer_norm_quantize(x, x[0], x[0], 1e-5)):
        with pytest.raises(RuntimeError, match="compute capability 8.9 or newer"):
            op(x)
    # An Ampere GPU gets an error naming it, not a slow emulation (no GPU needed to check the message).
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert not supports_fp8("cuda")
    with pytest.raises(RuntimeError, match="A100-SXM4-80GB has compute capability 8.0.*precision='auto'"):
        check_fp8_device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert supports_fp8("cuda:0")


def test_bad_inputs():
    x, weight, bias = linear_inputs(T=4, K=32, N=16)
    w8, ws = quantize_weight(weight)
    q, qs = quantize_rows(x)
    cases = [
        (ValueError, "x must be a \\(T, K\\) tensor", (x[None], w8, ws, bias), {}),
        (TypeError, "x dtype must be one of", (x.double(), w8, ws, bias), {}),
        (ValueError, "weight_fp8 must be an \\(N, 32\\) tensor", (x, w8[:, :16], ws, bias), {}),
        (TypeError, "weight_fp8 must be torch.float8_e4m3fn", (x, weight, ws, bias), {}),
        (ValueError, "weight_scale must be a \\(1, 16\\) tensor", (x, w8, ws.t(), bias), {}),
        (TypeError, "weight_scale must be float32", (x, w8, ws.half(), bias), {}),
        (ValueError, "bias must be None or a floating \\(16,\\) tensor", (x, w8, ws, bias[:8]), {}),
        (ValueError, "an e4m3 x needs x_scale", (q, w8, ws, bias), {"out_dtype": torch.float32}),
        (ValueError, "an e4m3 x needs out_dtype", (q, w8, ws, bias), {"x_scale": qs}),
        (ValueError, "x_scale goes with an e4m3 x only", (x, w8, ws, bias), {"x_scale": qs}),
        (TypeError, "out_dtype must be one of", (x, w8, ws, bias), {"out_dtype": torch.float64}),
        (ValueError, "weight_fp8 device meta != x device cpu", (x, w8.to("meta"), ws, bias), {}),
    ]
    for error, match, args, kwargs in cases:
        with pytest.raises(error, match=match):
            fp8_linear(*args, **kwargs)
    with pytest.raises(ValueError, match="weight must be a floating \\(N, K\\) tensor"):
        quantize_weight(weight[0])
    with pytest.raises(TypeError, match="quantize_rows: x dtype"):
        quantize_rows(x.double())
    with pytest.raises(ValueError, match="y must match x"):
        add_layer_norm_quantize(x, x[:2], bias[:1].expand(32), bias[:1].expand(32), 1e-5)
    with pytest.raises(ValueError, match="layer_scale must be a floating \\(32,\\) tensor"):
        add_layer_norm_quantize(x, x, x[0], x[0], 1e-5, x[0, :4])


# -- CUDA --------------------------------------------------------------------------------------


def needs_fp8_gpu():
    if not (torch.cuda.is_available() and supports_fp8("cuda")):
        pytest.skip("needs an NVIDIA GPU of compute capability 8.9+")


@pytest.mark.cuda
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T, K, N", [(1000, 768, 2304), (197, 3072, 768), (5, 64, 192)])
def test_cuda_scaled_mm_matches_reference(T, K, N, out_dtype):
    needs_fp8_gpu()
    x, weight, bias = (t.cuda() for t in linear_inputs(T, K, N))
    x = x.bfloat16()
    w8, ws = quantize_weight(weight)
    got = fp8_linear(x, w8, ws, bias, out_dtype=out_dtype)
    want = fp8_linear_reference(x.cpu(), w8.cpu(), ws.cpu(), bias.cpu(), out_dtype=out_dtype)
    # The GPU's GEMM writes bf16 (cast to out_dtype): one bf16 rounding of the fp32 result.
    assert got.dtype == out_dtype
    torch.testing.assert_close(
        got.float().cpu(), want.float(), rtol=2**-7, atol=1e-3 * want.abs().max().item()
    )


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("K", [64, 768, 3072])
def test_cuda_quantize_kernels_match_references(dtype, K):
    needs_fp8_gpu()
    x = rand(300, K, dtype=dtype, scale=3.0, device="cuda")
    y = rand(300, K, dtype=torch.bfloat16, seed=1, device="cuda")
    w, b, g = (rand(K, seed=s, device="cuda") for s in (2, 3, 4))
    assert_quantized_equal(*quantize_rows(x), *quantize_rows_reference(x.cpu()), interpreter=False)
    within_one_step(
        *quantize_rows(x, gelu=True), *quantize_rows_reference(F.gelu(x.cpu().float())), share=0.99
    )
    within_one_step(
        *layer_norm_quantize(x, w, b, 1e-6),
        *layer_norm_quantize_reference(x.cpu(), w.cpu(), b.cpu(), 1e-6),
        share=0.99,
    )
    s, *quantized = add_layer_norm_quantize(x, y, w, b, 1e-6, g)
    s_ref, *reference = add_layer_norm_quantize_reference(x.cpu(), y.cpu(), w.cpu(), b.cpu(), 1e-6, g.cpu())
    # The kernel may fuse gamma * y + x into one FMA: s can differ by one rounding of its dtype.
    torch.testing.assert_close(s.cpu(), s_ref, rtol=2**-7 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)
    within_one_step(*quantized, *reference, share=0.99)


@pytest.mark.cuda
def test_cuda_capability_check_matches_the_device():
    major, minor = torch.cuda.get_device_capability()
    assert supports_fp8("cuda") == ((major, minor) >= (8, 9) and torch.version.hip is None)
    if not supports_fp8("cuda"):
        with pytest.raises(RuntimeError, match="compute capability"):
            check_fp8_device("cuda")
