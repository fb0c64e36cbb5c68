"""The coalition engine: a model's output on B images × M patch coalitions in one batched pass.

- :mod:`~shapkern.engine.vit`: the packed path for timm ViTs (tokens of absent patches dropped).
- :mod:`~shapkern.engine.masked`: pixel masking, for any image classifier.
- :mod:`~shapkern.engine.inputs`: the checks every path shares, and model introspection.
- :mod:`~shapkern.engine.chunking`: rows per pass from the device's free memory.
"""

from shapkern.engine.chunking import check_chunk_size, run_chunks
from shapkern.engine.inputs import check_coalitions, check_images, find_patch_embed, patch_grid
from shapkern.engine.masked import BASELINES, masked_input_forward
from shapkern.engine.vit import (
    OUTPUTS,
    PRECISIONS,
    PackedTokens,
    check_packed_model,
    check_precision,
    coalition_chunk_rows,
    coalition_tokens,
    embed_tokens,
    fused_coalition_forward,
    num_players,
    packed_block_forward,
)

__all__ = [
    "BASELINES",
    "OUTPUTS",
    "PRECISIONS",
    "PackedTokens",
    "check_chunk_size",
    "check_coalitions",
    "check_images",
    "check_packed_model",
    "check_precision",
    "coalition_chunk_rows",
    "coalition_tokens",
    "embed_tokens",
    "find_patch_embed",
    "fused_coalition_forward",
    "masked_input_forward",
    "num_players",
    "packed_block_forward",
    "patch_grid",
    "run_chunks",
]
