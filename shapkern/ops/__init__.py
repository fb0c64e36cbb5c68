"""Autograd ops with a plain PyTorch reference each, dispatched by device (CUDA: Triton or the native
extension; elsewhere: the C++ CPU kernels or the reference)."""

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
    "coalition_gram",
    "coalition_reduce",
    "layer_norm",
    "linear_gelu",
    "pack_masks",
    "segment_expand",
    "segment_sum",
    "unpack_masks",
    "varlen_attention",
]
