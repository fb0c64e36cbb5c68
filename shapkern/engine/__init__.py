"""The coalition engine: a model's outputs on B images × M patch coalitions in one batched pass.

- :mod:`~shapkern.engine.forward`: the packed path (tokens of absent patches dropped), for every
  model family with an adapter in :mod:`~shapkern.engine.adapters`.
- :mod:`~shapkern.engine.masked`: pixel masking, for any image classifier.
- :mod:`~shapkern.engine.inputs`: the checks every path shares, and model introspection.
- :mod:`~shapkern.engine.chunking`: rows per pass from the device's free memory.
- :mod:`~shapkern.engine.blocks`, :mod:`~shapkern.engine.fp8`: timm Blocks on packed tokens.
"""

from shapkern._deprecation import renamed_function
from shapkern.engine.adapters import DualEncoder, ModelAdapter, adapter_for, dual_encoder
from shapkern.engine.blocks import packed_block_forward
from shapkern.engine.chunking import check_chunk_rows, run_chunks
from shapkern.engine.forward import (
    CoalitionForward,
    PackedTokens,
    check_packed_model,
    coalition_chunk_rows,
    coalition_tokens,
    embed_tokens,
    fused_coalition_forward,
    num_players,
    resolve_paired,
)
from shapkern.engine.fp8 import clear_fp8_weights
from shapkern.engine.inputs import check_coalitions, check_images, find_patch_embed, patch_grid
from shapkern.engine.masked import BASELINES, Baseline, MaskedInputForward, masked_input_forward, model_output
from shapkern.engine.options import (
    BLOCKS,
    MODES,
    OUTPUTS,
    PRECISIONS,
    Blocks,
    Mode,
    Output,
    Precision,
    check_precision,
)

__all__ = [
    "BASELINES",
    "BLOCKS",
    "MODES",
    "OUTPUTS",
    "PRECISIONS",
    "Baseline",
    "Blocks",
    "CoalitionForward",
    "DualEncoder",
    "MaskedInputForward",
    "Mode",
    "ModelAdapter",
    "Output",
    "PackedTokens",
    "Precision",
    "adapter_for",
    "check_chunk_rows",
    "check_coalitions",
    "check_images",
    "check_packed_model",
    "check_precision",
    "clear_fp8_weights",
    "dual_encoder",
    "coalition_chunk_rows",
    "coalition_tokens",
    "embed_tokens",
    "find_patch_embed",
    "fused_coalition_forward",
    "masked_input_forward",
    "model_output",
    "num_players",
    "packed_block_forward",
    "patch_grid",
    "resolve_paired",
    "run_chunks",
]

# Deprecated name (removed in the next release): rows per pass are "chunk_rows".
check_chunk_size = renamed_function("check_chunk_size", "shapkern.engine.check_chunk_rows", check_chunk_rows)
