"""Autograd ops with a plain PyTorch reference each, dispatched by device (CUDA: Triton or the native
extension; elsewhere: the C++ CPU kernels or the reference)."""

from shapkern.ops.fp8_linear import (
    add_layer_norm_quantize,
    check_fp8_device,
    fp8_linear,
    layer_norm_quantize,
    quantize_rows,
    supports_fp8,
)
from shapkern.ops.fp8_reference import quantize_weight
from shapkern.ops.gram import coalition_gram
from shapkern.ops.layer_norm import add_layer_norm, layer_norm
from shapkern.ops.linear_gelu import linear_gelu
from shapkern.ops.reduce import (
    coalition_reduce,
    pack_masks,
    segment_expand,
    segment_sum,
    unpack_masks,
)
from shapkern.ops.varlen_attention import AttentionFn, varlen_attention

__all__ = [
    "AttentionFn",
    "add_layer_norm",
    "add_layer_norm_quantize",
    "check_fp8_device",
    "coalition_gram",
    "coalition_reduce",
    "fp8_linear",
    "layer_norm",
    "layer_norm_quantize",
    "linear_gelu",
    "pack_masks",
    "quantize_rows",
    "quantize_weight",
    "segment_expand",
    "segment_sum",
    "supports_fp8",
    "unpack_masks",
    "varlen_attention",
]
