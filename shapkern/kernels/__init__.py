"""Triton kernels and their launchers, one module per kernel family."""

from shapkern.kernels.coalition_reduce import (
    coalition_gram,
    coalition_reduce_backward,
    coalition_reduce_forward,
)
from shapkern.kernels.fp8 import quantize_rows_forward
from shapkern.kernels.layer_norm import layer_norm_backward, layer_norm_forward
from shapkern.kernels.linear_gelu import gelu_backward, linear_gelu_forward
from shapkern.kernels.varlen_attention import varlen_attention_backward, varlen_attention_forward

__all__ = [
    "coalition_gram",
    "coalition_reduce_backward",
    "coalition_reduce_forward",
    "gelu_backward",
    "layer_norm_backward",
    "layer_norm_forward",
    "linear_gelu_forward",
    "quantize_rows_forward",
    "varlen_attention_backward",
    "varlen_attention_forward",
]
