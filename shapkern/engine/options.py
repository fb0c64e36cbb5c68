"""The engine's string options as ``Literal`` types, the tuples checked at run time derived from them
(so the two cannot drift), and their checks (docs/design.md, "Glossary")."""

from __future__ import annotations

import warnings
from typing import Literal, get_args

from shapkern.engine.adapters import BlockPath, Output

__all__ = [
    "ATTENTIONS",
    "BLOCKS",
    "MODES",
    "OUTPUTS",
    "PRECISIONS",
    "Attention",
    "Blocks",
    "Mode",
    "Output",
    "Precision",
    "block_path",
    "check_precision",
    "legacy_blocks",
]

# "logits" (R, K) or "pre_logits" (R, D) per (image, coalition) row.
OUTPUTS: tuple[Output, ...] = get_args(Output)
# "auto": the model's dtype under the current autocast; "fp8": e4m3 GEMMs, forward only (engine/fp8.py).
Precision = Literal["auto", "fp8"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
# How the blocks run: "auto" picks "compiled" on CUDA with paired coalitions, else "plain".
Blocks = Literal["auto", "plain", "compiled", "fused"]
BLOCKS: tuple[Blocks, ...] = get_args(Blocks)
# The attention inside the blocks: "auto" follows the measured dispatch (engine/dispatch.py), "varlen"
# the varlen kernels (Triton on CUDA), "pairs" complementary pairs as dense rows (SDPA; pairs only).
Attention = Literal["auto", "varlen", "pairs"]
ATTENTIONS: tuple[Attention, ...] = get_args(Attention)
# "packed": tokens of absent patches dropped; "input": their pixels replaced by a baseline.
Mode = Literal["packed", "input"]
MODES: tuple[Mode, ...] = get_args(Mode)


def check_precision(precision: str) -> None:
    """A clear error for a ``precision`` that is not one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def block_path(blocks: Blocks, precision: Precision) -> BlockPath | None:
    """The block path fixed by ``blocks`` and ``precision``; None: decided per call (blocks="auto")."""
    check_precision(precision)
    if blocks not in BLOCKS:
        raise ValueError(f"blocks must be one of {BLOCKS}, got {blocks!r}")
    if precision == "fp8":
        if blocks not in ("auto", "plain"):
            raise ValueError(f"precision='fp8' runs its own block path: it excludes blocks={blocks!r}")
        return "fp8"
    return None if blocks == "auto" else blocks


def legacy_blocks(blocks: Blocks, compiled: bool | None, fused: bool | None) -> Blocks:
    """``blocks`` from the keywords it replaces (``compiled=``, ``fused=``; deprecated in 0.3)."""
    if compiled is None and fused is None:
        return blocks
    warnings.warn(
        "compiled= and fused= are deprecated: pass blocks='compiled', 'fused' or 'plain'",
        DeprecationWarning,
        stacklevel=3,
    )
    if compiled and fused:
        raise ValueError("compiled=True and fused=True exclude each other: pick one way to fuse the blocks")
    if fused:
        return "fused"
    if compiled is not None:
        return "compiled" if compiled else "plain"
    return blocks
