"""Triton kernels and their launchers, one module per kernel family."""

from shapkern.kernels.varlen_attention import varlen_attention_backward, varlen_attention_forward

__all__ = ["varlen_attention_backward", "varlen_attention_forward"]
