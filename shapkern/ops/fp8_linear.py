"""fp8 (e4m3) linear layers for forward-only evaluation: rowwise-scaled GEMMs, activation quantisation.

``fp8_linear(x, weight_fp8, weight_scale, bias)`` computes
``(q_x * scale_x) @ (weight_fp8 * weight_scale)ᵀ + bias`` for x (T, K): the activation is quantised per row
(scale_x (T, 1) fp32), the weight per output channel (weight_fp8 (N, K), weight_scale (1, N) fp32, from
:func:`~shapkern.ops.fp8_reference.quantize_weight`), both as ``ops.fp8_reference`` describes (scale =
amax / 448, rounding to nearest even). The GEMM accumulates in fp32 and applies both scales and the bias
before it rounds the (T, N) output to ``out_dtype``.

On CUDA (NVIDIA, compute capability 8.9 or newer) the activation is quantised by a Triton kernel that can
also compute it (exact GELU, LayerNorm, residual add + LayerNorm: :func:`quantize_rows`,
:func:`layer_norm_quantize`, :func:`add_layer_norm_quantize`) and the GEMM runs in ``torch._scaled_mm``;
older GPUs are an error, not a slow emulation. On the CPU ``torch._scaled_mm`` runs rowwise-scaled e4m3
GEMMs where the torch build has them (torch 2.14 does, as the fp32 product of the dequantised operands),
else :func:`~shapkern.ops.fp8_reference.fp8_linear_reference` computes the same; the activations are
quantised by the references. The CPU thus evaluates the fp8 numerics for tests and error studies.
Everything is forward only: an input that requires grad under grad mode is an error.
"""

from functools import cache

import torch
import torch.nn.functional as F

from shapkern.ops.fp8_reference import (
    AMAX_FLOOR,
    FP8,
    _describe,
    add_layer_norm_quantize_reference,
    fp8_linear_reference,
    layer_norm_quantize_reference,
    quantize_rows_reference,
)

try:
    from shapkern.kernels.fp8 import MAX_K, quantize_rows_forward

    _HAS_TRITON = True
except ImportError:  # no triton: every device takes the reference path
    MAX_K = 0
    _HAS_TRITON = False

__all__ = [
    "FORWARD_ONLY",
    "add_layer_norm_quantize",
    "check_fp8_device",
    "fp8_linear",
    "layer_norm_quantize",
    "quantize_rows",
    "supports_fp8",
]

FORWARD_ONLY = (
    "fp8 evaluation is forward-only; use precision='auto' for gradients "
    "(or run under torch.no_grad() / with parameters that do not require grad)"
)
_HIGH_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# -- devices -----------------------------------------------------------------------------------


def supports_fp8(device: torch.device | str) -> bool:
    """Whether ``device`` runs the fp8 path: the CPU (reference numerics) and NVIDIA GPUs of compute
    capability 8.9 or newer (e4m3 tensor cores: Ada, Hopper, Blackwell)."""
    device = torch.device(device)
    if device.type == "cpu":
        return True
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def check_fp8_device(device: torch.device | str) -> None:
    """Raise RuntimeError, naming the device, unless :func:`supports_fp8` (no slow emulation elsewhere)."""
    device = torch.device(device)
    if supports_fp8(device):
        return
    if device.type == "cuda" and torch.version.hip is None:
        major, minor = torch.cuda.get_device_capability(device)
        found = f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor}"
    else:
        found = f"got device {device}" + (" (ROCm)" if torch.version.hip is not None else "")
    raise RuntimeError(
        "precision='fp8' needs the CPU (reference numerics) or an NVIDIA GPU of compute capability 8.9 or "
        f"newer (e4m3 tensor cores); {found}. Use precision='auto'."
    )


@cache
def _cpu_scaled_mm() -> bool:
    """Whether this torch build runs rowwise-scaled e4m3 ``torch._scaled_mm`` on the CPU (2.14 does)."""
    a = torch.ones(16, 16, dtype=FP8)
    try:
        torch._scaled_mm(
            a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32
        )
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _check_forward_only(*tensors: torch.Tensor | None) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(FORWARD_ONLY)


# -- activation quantisation: Triton on CUDA ---------------------------------------------------


@torch.library.custom_op("shapkern::fp8_quantize_rows", mutates_args=())
def _quantize_op(
    x: torch.Tensor,
    y: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    layer_scale: torch.Tensor | None,
    eps: float,
    prologue: str,
    s_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s, q, scale = quantize_rows_forward(x, y, weight, bias, layer_scale, eps, prologue, s_dtype, AMAX_FLOOR)
    # Custom ops cannot return None: without a residual add s is an empty stand-in.
    return x.new_empty(0) if s is None else s, q, scale


@_quantize_op.register_fake
def _(x, y, weight, bias, layer_scale, eps, prologue, s_dtype):
    s = x.new_empty(0) if y is None else x.new_empty(x.shape, dtype=s_dtype)
    return s, x.new_empty(x.shape, dtype=FP8), x.new_empty((x.shape[0], 1), dtype=torch.float32)


def _check_rows(name: str, x, *, fp8_ok: bool = False) -> None:
    dtypes = (*_HIGH_DTYPES, FP8) if fp8_ok else _HIGH_DTYPES
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name}: x must be a (T, K) tensor, got {_describe(x)}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name}: x dtype must be one of {dtypes}, got {x.dtype}")
    check_fp8_device(x.device)  # before any Triton fp8 code meets a GPU without e4m3


def _check_vectors(name: str, x: torch.Tensor, **vectors) -> None:
    K = x.shape[1]
    for arg, v in vectors.items():
        if v is None:
            continue
        if not isinstance(v, torch.Tensor) or v.shape != (K,) or not v.is_floating_point():
            raise ValueError(
                f"{name}: {arg} must be a floating ({K},) tensor for x of shape "
                f"{tuple(x.shape)}, got {_describe(v)}"
            )
        if v.device != x.device:
            raise ValueError(f"{name}: {arg} device {v.device} != x device {x.device}")


def _triton_rows(x: torch.Tensor) -> bool:
    return _HAS_TRITON and x.is_cuda and x.shape[1] <= MAX_K


def quantize_rows(x: torch.Tensor, *, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantisation of x, or of its exact GELU with ``gelu=True``: (T, K) -> q (T, K)
    float8_e4m3fn, scale (T, 1) fp32 with x ≈ q * scale (see ``ops.fp8_reference``).

    x: float16, bfloat16 or float32. CUDA tensors run one Triton pass (GELU in fp32, never rounded to
    x's dtype); other devices the reference. Forward only.
    """
    _check_rows("quantize_rows", x)
    _check_forward_only(x)
    if _triton_rows(x):
        _, q, scale = _quantize_op(x, None, None, None, None, 0.0, "gelu" if gelu else "none", None)
        return q, scale
    return quantize_rows_reference(F.gelu(x.float()) if gelu else x)


def layer_norm_quantize(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm of x (over K, affine) quantised per row: (T, K) -> q (T, K) e4m3, scale (T, 1) fp32.

    The normalised rows stay fp32 up to the quantisation. CUDA: one Triton pass; elsewhere the reference
    (``ops.fp8_reference``). Forward only.
    """
    _check_rows("layer_norm_quantize", x)
    _check_vectors("layer_norm_quantize", x, weight=weight, bias=bias)
    _check_forward_only(x, weight, bias)
    if _triton_rows(x):
        _, q, scale = _quantize_op(x, None, weight, bias, None, eps, "layer_norm", None)
        return q, scale
    return layer_norm_quantize_reference(x, weight, bias, eps)


def add_layer_norm_quantize(
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    layer_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The residual add s = x + layer_scale * y of a pre-norm block and the quantised LayerNorm of s.

    x, y: (T, K) (e.g. an fp32 residual stream and a 16-bit branch); layer_scale: (K,) or None.
    Returns s (T, K) in the promoted dtype of x and y, q (T, K) e4m3 and scale (T, 1) fp32, from one read
    of x and y on CUDA (Triton); elsewhere the reference (``ops.fp8_reference``). Forward only.
    """
    name = "add_layer_norm_quantize"
    _check_rows(name, x)
    _check_rows(name, y)
    if y.shape != x.shape or y.device != x.device:
        raise ValueError(f"{name}: y must match x ({_describe(x)}), got {_describe(y)}")
    _check_vectors(name, x, weight=weight, bias=bias, layer_scale=layer_scale)
    _check_forward_only(x, y, weight, bias, layer_scale)
    if _triton_rows(x):
        s_dtype = torch.promote_types(x.dtype, y.dtype)
        return _quantize_op(x, y, weight, bias, layer_scale, eps, "layer_norm", s_dtype)
    return add_layer_norm_quantize_reference(x, y, weight, bias, eps, layer_scale)


# -- the GEMM ----------------------------------------------------------------------------------


def _check_linear(x, weight_fp8, weight_scale, bias, out_dtype, x_scale) -> None:
    name = "fp8_linear"
    _check_rows(name, x, fp8_ok=True)
    T, K = x.shape
    if not isinstance(weight_fp8, torch.Tensor) or weight_fp8.dim() != 2 or weight_fp8.shape[1] != K:
        raise ValueError(
            f"{name}: weight_fp8 must be an (N, {K}) tensor for x of shape {tuple(x.shape)}, "
            f"got {_describe(weight_fp8)}"
        )
    if weight_fp8.dtype != FP8:
        raise TypeError(f"{name}: weight_fp8 must be {FP8} (see ops.quantize_weight), got {weight_fp8.dtype}")
    N = weight_fp8.shape[0]
    if not isinstance(weight_scale, torch.Tensor) or weight_scale.shape != (1, N):
        raise ValueError(f"{name}: weight_scale must be a (1, {N}) tensor, got {_describe(weight_scale)}")
    if bias is not None and (
        not isinstance(bias, torch.Tensor) or bias.shape != (N,) or not bias.is_floating_point()
    ):
        raise ValueError(f"{name}: bias must be None or a floating ({N},) tensor, got {_describe(bias)}")
    if x.dtype == FP8:
        if not isinstance(x_scale, torch.Tensor) or x_scale.shape != (T, 1):
            raise ValueError(f"{name}: an e4m3 x needs x_scale, a ({T}, 1) tensor, got {_describe(x_scale)}")
        if out_dtype is None:
            raise ValueError(f"{name}: an e4m3 x needs out_dtype (one of {_HIGH_DTYPES})")
    elif x_scale is not None:
        raise ValueError(f"{name}: x_scale goes with an e4m3 x only; x is {x.dtype}")
    for arg, scale in (("weight_scale", weight_scale), ("x_scale", x_scale)):
        if scale is not None and scale.dtype != torch.float32:
            raise TypeError(f"{name}: {arg} must be float32, got {scale.dtype}")
    if out_dtype is not None and out_dtype not in _HIGH_DTYPES:
        raise TypeError(f"{name}: out_dtype must be one of {_HIGH_DTYPES}, got {out_dtype}")
    for arg, t in (
        ("weight_fp8", weight_fp8),
        ("weight_scale", weight_scale),
        ("bias", bias),
        ("x_scale", x_scale),
    ):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: {arg} device {t.device} != x device {x.device}")
    if x.is_cuda and (K % 16 or N % 16):
        raise ValueError(f"{name}: torch._scaled_mm needs K and N divisible by 16 on CUDA, got K={K}, N={N}")


def fp8_linear(
    x: torch.Tensor,
    weight_fp8: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
    x_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ weightᵀ + bias`` with both operands in e4m3: (T, K) -> (T, N) in out_dtype.

    Args:
        x: (T, K) float16, bfloat16 or float32, quantised per row on the fly; or already e4m3 (from
            :func:`quantize_rows` and its fused variants) with its ``x_scale`` (T, 1) fp32.
        weight_fp8, weight_scale: (N, K) e4m3 and (1, N) fp32 from
            :func:`~shapkern.ops.fp8_reference.quantize_weight`.
        bias: (N,) or None, added in the GEMM's epilogue for 16-bit outputs (as ``out_dtype``), after it
            for fp32 ones.
        out_dtype: float16, bfloat16 or float32; default x's dtype (required for an e4m3 x). On CUDA
            the GEMM writes bf16 (with the bias in its epilogue), cast to out_dtype.

    CUDA needs compute capability 8.9+ and K, N divisible by 16. Forward only: an x or bias that requires
    grad under grad mode is a RuntimeError.
    """
    _check_linear(x, weight_fp8, weight_scale, bias, out_dtype, x_scale)
    _check_forward_only(x, bias)
    out_dtype = out_dtype or x.dtype
    if x.dtype != FP8:
        x, x_scale = quantize_rows(x)
    assert x_scale is not None  # for the type checker: _check_linear requires it with an e4m3 x
    if not (x.is_cuda or _cpu_scaled_mm()):
        return fp8_linear_reference(x, weight_fp8, weight_scale, bias, out_dtype=out_dtype, x_scale=x_scale)
    # Rowwise-scaled GEMMs write bf16 on every fp8 GPU and torch version (fp32 needs cuBLAS 12.9+ and
    # sm_90, fp16 a recent torch); bf16's rounding (2^-9) is far below the e4m3 operands' (2^-4).
    gemm_dtype = torch.bfloat16 if x.is_cuda else out_dtype
    # The epilogue takes a 16-bit bias of the output's dtype, none with an fp32 output.
    epilogue = bias is not None and gemm_dtype != torch.float32
    y = torch._scaled_mm(
        x.contiguous(),
        weight_fp8.contiguous().t(),
        scale_a=x_scale.contiguous(),
        scale_b=weight_scale.contiguous(),
        bias=bias.to(gemm_dtype) if epilogue and bias is not None else None,
        out_dtype=gemm_dtype,
    )
    y = y if bias is None or epilogue else y + bias.float()
    return y.to(out_dtype)
