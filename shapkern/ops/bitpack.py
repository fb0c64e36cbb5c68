"""Bit-packed coalitions: bool (..., N) <-> int32 (..., ⌈N/32⌉) words, player n = bit ``n % 32``
(little-endian) of word ``n // 32``, padding bits 0 (docs/design.md, "Glossary").

The reductions over coalitions (:mod:`shapkern.ops.reduce`, :mod:`shapkern.ops.gram`) read their
coalitions in this form. Each op has a plain PyTorch reference (``*_reference``) and runs
``torch.ops.shapkern.pack_masks`` / ``unpack_masks`` (the extension's names) where the extension
has kernels for the device; their fake kernels are registered in :mod:`shapkern.ops.reduce`, the
module the extension's schemas name (csrc/schemas.cpp).
"""

from __future__ import annotations

import torch

from shapkern.ops import _extension as _ext
from shapkern.ops._checks import check, check_num_players, num_words

__all__ = [
    "pack_coalitions",
    "pack_coalitions_reference",
    "unpack_coalitions",
    "unpack_coalitions_reference",
]


def pack_coalitions_reference(coalitions: torch.Tensor) -> torch.Tensor:
    """PyTorch reference of :func:`pack_coalitions`."""
    count = num_words(coalitions.shape[-1])
    bits = torch.nn.functional.pad(coalitions.to(torch.int64), (0, 32 * count - coalitions.shape[-1]))
    shifts = torch.arange(32, device=coalitions.device, dtype=torch.int64)
    words = (bits.unflatten(-1, (count, 32)) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement


def unpack_coalitions_reference(packed: torch.Tensor, num_players: int) -> torch.Tensor:
    """PyTorch reference of :func:`unpack_coalitions`."""
    shifts = torch.arange(32, device=packed.device, dtype=torch.int32)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :num_players].bool()


def pack_coalitions(coalitions: torch.Tensor) -> torch.Tensor:
    """Bit-pack coalitions: bool (..., N) -> int32 (..., ⌈N/32⌉).

    Player n is bit ``n % 32`` (little-endian) of word ``n // 32``; padding bits are 0.
    """
    op = "pack_coalitions"
    check(coalitions.dtype == torch.bool, op, f"coalitions must be bool, got {coalitions.dtype}")
    check(coalitions.dim() >= 1, op, "coalitions must have a last dimension of players (..., N)")
    if _ext.has_kernels(coalitions.device):
        return torch.ops.shapkern.pack_masks(coalitions)
    return pack_coalitions_reference(coalitions)


def unpack_coalitions(packed: torch.Tensor, num_players: int) -> torch.Tensor:
    """Unpack coalitions: int32 (..., W) -> bool (..., N) with N = ``num_players`` <= 32 W."""
    op = "unpack_coalitions"
    check(packed.dtype == torch.int32, op, f"packed must be int32, got {packed.dtype}")
    check(packed.dim() >= 1, op, "packed must have a last dimension of words (..., W)")
    check_num_players(num_players, op)
    check(
        packed.shape[-1] >= num_words(num_players),
        op,
        f"packed has W={packed.shape[-1]} words, too few for num_players={num_players}",
    )
    if _ext.has_kernels(packed.device):
        return torch.ops.shapkern.unpack_masks(packed, num_players)
    return unpack_coalitions_reference(packed, num_players)
