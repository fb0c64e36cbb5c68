"""The games a model defines on a batch of images: v_x(S) = the model's outputs on image x with only
the patches in S present. Each checks the model and the images once, when built, and chunks its
own passes.

- :class:`PackedGame`: the packed engine (tokens of absent patches dropped), for the model
  families it runs.
- :class:`PixelGame`: pixel masking, for any image classifier.
- :class:`SelfExplainingGame`: a self-explaining model's own value function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from shapkern._deprecation import renamed_arguments
from shapkern.engine import (
    MODES,
    Baseline,
    Blocks,
    CoalitionForward,
    MaskedInputForward,
    Mode,
    Precision,
    adapter_for,
    check_precision,
    find_patch_embed,
)
from shapkern.games.base import Restrictable, SelfExplaining

__all__ = ["MODES", "Mode", "PackedGame", "PixelGame", "SelfExplainingGame", "model_game"]


class _ModelGame(Restrictable):
    """What the model games share: B, N, the device, and the engine's evaluation of coalitions
    (which checks them, bool (B, M, N) or (M, N), on every call) -> (B, M, K)."""

    forward: Callable[[torch.Tensor], torch.Tensor]

    def __init__(self, images: torch.Tensor, players: int):
        self.batch, self.players, self.device = images.shape[0], players, images.device

    def __call__(self, coalitions: torch.Tensor) -> torch.Tensor:
        return self.forward(coalitions)


class PackedGame(_ModelGame):
    """The packed engine's game: logits (B, M, K) of a model whose family the engine runs.

    Args: model, images (B, C, H, W), chunk_rows ((image, coalition) rows per pass), precision
    (``"auto"`` or ``"fp8"``), blocks (see :func:`~shapkern.engine.fused_coalition_forward`).
    """

    @renamed_arguments(chunk_size="chunk_rows")
    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        *,
        chunk_rows: int | None = None,
        precision: Precision = "auto",
        blocks: Blocks = "auto",
        sync_checks: bool = False,
    ):
        self.forward = CoalitionForward(
            model, images, chunk_rows=chunk_rows, precision=precision, blocks=blocks, sync_checks=sync_checks
        )
        super().__init__(images, self.forward.num_players)


class PixelGame(_ModelGame):
    """Pixel masking's game: any classifier's outputs (B, M, K) with absent patches replaced by
    ``baseline`` (``"zeros"``, ``"mean"`` or ``"blur"``); ``players`` N for a model without a timm
    patch grid (then a square grid)."""

    @renamed_arguments(chunk_size="chunk_rows")
    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        *,
        baseline: Baseline = "zeros",
        players: int | None = None,
        chunk_rows: int | None = None,
        sync_checks: bool = False,
    ):
        self.forward = MaskedInputForward(
            model, images, baseline=baseline, chunk_rows=chunk_rows, sync_checks=sync_checks
        )
        super().__init__(images, _players(model, players))


class SelfExplainingGame(_ModelGame):
    """A self-explaining model's own value function v_x(S) = Σ_{n∈S} Φ(x_S)_n (B, M, K)."""

    @renamed_arguments(chunk_size="chunk_rows")
    def __init__(
        self,
        model: SelfExplaining,
        images: torch.Tensor,
        *,
        chunk_rows: int | None = None,
        precision: Precision = "auto",
        sync_checks: bool = False,
    ):
        self.forward = model.coalition_forward(
            images, chunk_rows=chunk_rows, precision=precision, sync_checks=sync_checks
        )
        super().__init__(images, model.num_players)


def _players(model: nn.Module, players: int | None) -> int:
    """N: the patches of a self-explaining model, of a model the packed engine runs, of a timm patch
    embedding inside any model, or ``players`` (which must agree with the model's N if it has one)."""
    embed = find_patch_embed(model)
    num: int | None
    if isinstance(model, SelfExplaining):
        num = model.num_players
    elif _packed(model):
        num = adapter_for(model).num_players
    else:
        num = embed.num_patches if embed is not None else players
    if num is None:
        raise ValueError("the model has no timm patch embedding: pass players=N (a square patch grid)")
    if players is not None and players != num:
        raise ValueError(f"players={players} but the model has {num} patches")
    return num


def _packed(model: nn.Module) -> bool:
    try:
        adapter_for(model)
    except NotImplementedError:
        return False
    return True


@renamed_arguments(chunk_size="chunk_rows")
def model_game(
    model: nn.Module,
    images: torch.Tensor,
    *,
    mode: Mode | None = None,
    baseline: Baseline = "zeros",
    players: int | None = None,
    chunk_rows: int | None = None,
    precision: Precision = "auto",
    sync_checks: bool = False,
) -> PackedGame | PixelGame | SelfExplainingGame:
    """The game v_x(S) = the outputs of ``model`` on each image x with only the patches in S present.

    Args:
        model: a self-explaining model (its own value function, unless ``mode="input"``: then its
            logits on pixel-masked images), a model the packed engine runs (tokens dropped), or any
            classifier (pixel masking).
        images: (B, C, H, W) on the model's device.
        mode: force ``"packed"`` or ``"input"``; default picks as above.
        baseline: pixels of absent patches in input mode: ``"zeros"``, ``"mean"`` or ``"blur"``.
        players: N for models without a timm patch embedding (input mode, square grid).
        chunk_rows: (image, coalition) rows per pass (default: from free memory).
        precision: ``"auto"`` or ``"fp8"`` (e4m3 GEMMs in the packed engine, forward only).
        sync_checks: a NaN image is a ValueError on CUDA too, at the cost of one host sync.

    Returns:
        A :class:`Game` with coalitions (B, M, N) -> outputs (B, M, K).
    """
    check_precision(precision)
    if mode not in (None, *MODES):
        raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
    game: SelfExplainingGame | PackedGame
    if isinstance(model, SelfExplaining) and mode != "input":
        game = SelfExplainingGame(
            model, images, chunk_rows=chunk_rows, precision=precision, sync_checks=sync_checks
        )
    elif mode == "packed" or (mode is None and _packed(model)):
        game = PackedGame(model, images, chunk_rows=chunk_rows, precision=precision, sync_checks=sync_checks)
    elif precision != "auto":
        raise ValueError(f"precision={precision!r} needs mode='packed': pixel masking runs the model as is")
    else:  # N from the model or `players`, checked by the game
        return PixelGame(
            model, images, baseline=baseline, players=players, chunk_rows=chunk_rows, sync_checks=sync_checks
        )
    if players is not None and players != game.players:  # the engine's N, read once when the game was built
        raise ValueError(f"players={players} but the model has {game.players} patches")
    return game
