"""shapkern: fast Shapley values for Vision Transformers.

Fused Triton kernels evaluate a ViT on many patch coalitions in one packed pass; a C++/CUDA
extension does the reductions over coalitions. The layers, bottom up: ``kernels`` (Triton) and the
extension → ``ops`` (autograd ops with PyTorch references) → ``coalitions`` and ``packed`` →
``engine`` → ``models``, ``explainers``, ``data``, ``training`` → ``cli``. See README.md.
"""

__version__ = "0.2.0.dev0"

from shapkern.coalitions import (
    MAX_EXACT_PLAYERS,
    all_coalitions,
    permutation_chain,
    sample_coalitions,
    sample_permutations,
    seeded_coalitions,
)
from shapkern.data import load_dataset
from shapkern.engine import PackedTokens, coalition_tokens, fused_coalition_forward, masked_input_forward
from shapkern.explainers import Attribution, estimate, explain, value_function
from shapkern.games import Game, SelfExplaining, ValueFunction, model_game
from shapkern.models import ShapleyOutput, ShapleyViT
from shapkern.ops import coalition_reduce, pack_masks, segment_sum, unpack_masks, varlen_attention
from shapkern.packed import PackPlan, pack_plan, pack_tokens
from shapkern.training import ShapleyLoss, TrainConfig, train

__all__ = [
    "MAX_EXACT_PLAYERS",
    "Attribution",
    "Game",
    "PackPlan",
    "PackedTokens",
    "ShapleyLoss",
    "ShapleyOutput",
    "SelfExplaining",
    "ShapleyViT",
    "TrainConfig",
    "ValueFunction",
    "__version__",
    "all_coalitions",
    "coalition_reduce",
    "coalition_tokens",
    "estimate",
    "explain",
    "fused_coalition_forward",
    "load_dataset",
    "masked_input_forward",
    "model_game",
    "pack_masks",
    "pack_plan",
    "pack_tokens",
    "permutation_chain",
    "sample_coalitions",
    "sample_permutations",
    "seeded_coalitions",
    "segment_sum",
    "train",
    "unpack_masks",
    "value_function",
    "varlen_attention",
]
