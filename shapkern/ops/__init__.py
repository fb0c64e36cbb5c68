"""Autograd ops with a plain PyTorch reference each, dispatched by device."""

from shapkern.ops.reduce import coalition_reduce, pack_masks, segment_sum, unpack_masks
from shapkern.ops.varlen_attention import varlen_attention

__all__ = ["coalition_reduce", "pack_masks", "segment_sum", "unpack_masks", "varlen_attention"]
