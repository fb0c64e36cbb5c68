"""shapkern: fast Shapley values for Vision Transformers.

Fused Triton kernels evaluate a ViT on many patch coalitions in one packed pass; a C++/CUDA
extension does the reductions over coalitions. See README.md for the quick start.
"""

__version__ = "0.1.0"

from shapkern.coalitions import (
    PackPlan,
    all_coalitions,
    pack_plan,
    permutation_chain,
    sample_coalitions,
    sample_permutations,
)
from shapkern.engine import PackedTokens, fused_coalition_forward, masked_input_forward
from shapkern.ops import coalition_reduce, pack_masks, segment_sum, unpack_masks, varlen_attention

__all__ = [
    "PackPlan",
    "PackedTokens",
    "__version__",
    "all_coalitions",
    "coalition_reduce",
    "fused_coalition_forward",
    "masked_input_forward",
    "pack_masks",
    "pack_plan",
    "permutation_chain",
    "sample_coalitions",
    "sample_permutations",
    "segment_sum",
    "unpack_masks",
    "varlen_attention",
]
