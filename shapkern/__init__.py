"""shapkern: fast Shapley values for Vision Transformers.

Fused Triton kernels evaluate a ViT on many patch coalitions in one packed pass; a C++/CUDA
extension does the reductions over coalitions. The layers, bottom up: ``kernels`` (Triton) and the
extension → ``ops`` (autograd ops with PyTorch references) → ``coalitions`` and ``packed`` →
``engine`` → ``models``, ``explainers``, ``data``, ``training`` → ``cli``. See README.md.

The API has two tiers (docs/api.md): this package's ``__all__`` holds what users call (evaluate
coalitions, draw them, explain, train); :mod:`shapkern.ops` and :mod:`shapkern.packed` hold the
ops and the packed layout that hand-written models and new kernels build on.
"""

__version__ = "0.3.0.dev0"

from shapkern._deprecation import moved_names
from shapkern.coalitions import (
    MAX_EXACT_PLAYERS,
    CoalitionSampler,
    all_coalitions,
    sample_coalitions,
    sample_permutations,
)
from shapkern.data import load_dataset
from shapkern.engine import CoalitionForward, clear_fp8_weights, fused_coalition_forward
from shapkern.explainers import ESTIMATORS, Attribution, estimate, explain, explain_dataset, load_explanations
from shapkern.games import Game, SelfExplaining, model_game
from shapkern.models import ShapleyOutput, ShapleyViT
from shapkern.training import ShapleyLoss, TrainConfig, shapley_step, train

__all__ = [
    "ESTIMATORS",
    "MAX_EXACT_PLAYERS",
    "Attribution",
    "CoalitionForward",
    "CoalitionSampler",
    "Game",
    "SelfExplaining",
    "ShapleyLoss",
    "ShapleyOutput",
    "ShapleyViT",
    "TrainConfig",
    "__version__",
    "all_coalitions",
    "clear_fp8_weights",
    "estimate",
    "explain",
    "explain_dataset",
    "fused_coalition_forward",
    "load_dataset",
    "load_explanations",
    "model_game",
    "sample_coalitions",
    "sample_permutations",
    "shapley_step",
    "train",
]

# Deprecated at the top level (removed in the next release): the lower tier's names, served from
# their homes with a warning that names them.
__getattr__ = moved_names(
    __name__,
    {
        "PackPlan": "shapkern.packed.PackPlan",
        "PackedTokens": "shapkern.engine.PackedTokens",
        "ValueFunction": "shapkern.games.ValueFunction",
        "coalition_reduce": "shapkern.ops.coalition_reduce",
        "coalition_tokens": "shapkern.engine.coalition_tokens",
        "masked_input_forward": "shapkern.engine.masked_input_forward",
        "pack_masks": "shapkern.ops.pack_coalitions",
        "pack_plan": "shapkern.packed.pack_plan",
        "pack_tokens": "shapkern.packed.pack_tokens",
        "permutation_chain": "shapkern.coalitions.permutation_chain",
        "seeded_coalitions": "shapkern.coalitions.seeded_coalitions",
        "segment_sum": "shapkern.ops.segment_sum",
        "unpack_masks": "shapkern.ops.unpack_coalitions",
        "value_function": "shapkern.model_game",
        "varlen_attention": "shapkern.ops.varlen_attention",
    },
)
