"""Autograd ops with a plain PyTorch reference each, dispatched by device (CUDA: Triton or the native
extension; elsewhere: the C++ CPU kernels or the reference).

The lower tier of the API (docs/api.md): varlen attention, the reductions over bit-packed
coalitions, fused LayerNorm and GELU GEMMs, and fp8 GEMMs.
"""

from shapkern._deprecation import renamed_function
from shapkern.ops.bitpack import pack_coalitions, unpack_coalitions
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
from shapkern.ops.reduce import coalition_reduce, segment_expand, segment_sum
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
    "pack_coalitions",
    "quantize_rows",
    "quantize_weight",
    "segment_expand",
    "segment_sum",
    "supports_fp8",
    "unpack_coalitions",
    "varlen_attention",
]

# Deprecated names (removed in the next release): before "packed coalitions".
pack_masks = renamed_function("pack_masks", "shapkern.ops.pack_coalitions", pack_coalitions)
unpack_masks = renamed_function("unpack_masks", "shapkern.ops.unpack_coalitions", unpack_coalitions)
