"""fp8 (e4m3) numerics in plain PyTorch: the scales, the quantisation, the weight format and the GEMM.

The references of ``ops.fp8_linear`` (which dispatches by device) and what the CPU runs. One rule
everywhere: a row (of an activation (T, K), or of a Linear weight (N, K): one output channel) has
amax = max(max |row|, AMAX_FLOOR) and scale = amax / 448 (e4m3's largest value), and its elements
become q = e4m3(x * (448 / amax)) rounded to nearest even, so that x ≈ q * scale.
"""

import torch

from shapkern.ops.layer_norm import layer_norm_reference

__all__ = [
    "AMAX_FLOOR",
    "E4M3_MAX",
    "FP8",
    "add_layer_norm_quantize_reference",
    "fp8_linear_reference",
    "layer_norm_quantize_reference",
    "quantize_rows_reference",
    "quantize_weight",
]

FP8 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(FP8).max  # 448
# A row of zeros gets this amax: its scale stays a normal fp32 and 448 / amax stays finite.
AMAX_FLOOR = 2.0**-64


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)} on {v.device}"
    return type(v).__name__


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantisation in plain PyTorch: (T, K) -> q (T, K) float8_e4m3fn, scale (T, 1) fp32.

    amax = max(max |x_row|, AMAX_FLOOR), scale = amax / 448, q = e4m3(x * (448 / amax)) rounded to nearest
    even, so that x ≈ q * scale; what the Triton kernel computes, bit for bit.
    """
    a = x.float()
    amax = a.abs().amax(-1, keepdim=True).clamp(min=AMAX_FLOOR)
    limit = amax.new_full((), E4M3_MAX)
    # tensor / tensor is an IEEE division (a Python number / tensor multiplies by a reciprocal).
    q = (a * (limit / amax)).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
    return q, amax / limit


def layer_norm_quantize_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm of x in fp32, then :func:`quantize_rows_reference`: (T, K) -> q (T, K), scale (T, 1)."""
    h = layer_norm_reference(x.float(), weight.float(), bias.float(), eps)
    return quantize_rows_reference(h)


def add_layer_norm_quantize_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    layer_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """s = x + layer_scale * y (fp32, rounded to the promoted dtype of x and y), then the quantised
    LayerNorm of s: (T, K) -> s (T, K), q (T, K), scale (T, 1)."""
    branch = y.float() if layer_scale is None else y.float() * layer_scale.float()
    s = (x.float() + branch).to(torch.promote_types(x.dtype, y.dtype))
    return s, *layer_norm_quantize_reference(s, weight, bias, eps)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Linear weight (N, K) in e4m3 with one scale per output channel: weight_fp8 (N, K), scale (1, N) fp32.

    Rounds as :func:`quantize_rows_reference` does, so weight ≈ weight_fp8 * scale.T. Never tracks gradients.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_weight: weight must be a floating (N, K) tensor, got {_describe(weight)}")
    q, scale = quantize_rows_reference(weight.detach())
    return q, scale.reshape(1, -1)


def fp8_linear_reference(
    x: torch.Tensor,
    weight_fp8: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
    x_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``ops.fp8_linear`` in plain PyTorch: x (T, K) quantised per row (unless already e4m3 with x_scale
    (T, 1)), both operands dequantised to fp32 and multiplied in fp32 (also under autocast), the bias
    (rounded to out_dtype, as the GEMM's epilogue takes it) added, the result rounded to out_dtype.
    Returns (T, N)."""
    out_dtype = out_dtype or x.dtype
    if x.dtype != FP8:
        x, x_scale = quantize_rows_reference(x)
    elif x_scale is None:
        raise ValueError("fp8_linear_reference: an e4m3 x needs its x_scale (T, 1)")
    with torch.autocast(x.device.type, enabled=False):
        y = (x.float() * x_scale) @ (weight_fp8.float() * weight_scale.t()).t()
    if bias is not None:
        y = y + bias.to(out_dtype).float()
    return y.to(out_dtype)
