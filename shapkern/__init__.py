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
from shapkern.data import load_dataset
from shapkern.engine import PackedTokens, fused_coalition_forward, masked_input_forward
from shapkern.explain import Attribution, ValueFunction, estimate, explain, value_function
from shapkern.losses import ShapleyLoss
from shapkern.models import ShapleyViT
from shapkern.ops import coalition_reduce, pack_masks, segment_sum, unpack_masks, varlen_attention
from shapkern.train import TrainConfig, train

__all__ = [
    "Attribution",
    "PackPlan",
    "PackedTokens",
    "ShapleyLoss",
    "ShapleyViT",
    "TrainConfig",
    "ValueFunction",
    "__version__",
    "all_coalitions",
    "coalition_reduce",
    "estimate",
    "explain",
    "fused_coalition_forward",
    "load_dataset",
    "masked_input_forward",
    "pack_masks",
    "pack_plan",
    "permutation_chain",
    "sample_coalitions",
    "sample_permutations",
    "segment_sum",
    "train",
    "unpack_masks",
    "value_function",
    "varlen_attention",
]
