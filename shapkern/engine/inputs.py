"""Checks of what a caller hands the engine, and what the engine reads off a model.

Every path that evaluates a model on coalitions (packed, pixel masking, the explainers, the
self-explaining model) validates its images here, so a bad input gets the same clear error
everywhere instead of a traceback from deep inside timm or a silent NaN.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from timm.layers import PatchEmbed

__all__ = ["check_coalitions", "check_images", "find_patch_embed", "patch_grid"]


def find_patch_embed(model: nn.Module) -> PatchEmbed | None:
    """The first timm ``PatchEmbed`` inside model (its grid, image size and N), or None."""
    from timm.layers import PatchEmbed

    return next((m for m in model.modules() if isinstance(m, PatchEmbed)), None)


def patch_grid(model: nn.Module, players: int) -> tuple[int, int]:
    """The (rows, cols) grid of N = ``players`` patches: the model's timm patch grid, else square."""
    embed = find_patch_embed(model)
    grid = getattr(embed, "grid_size", None)
    if grid is not None and grid[0] * grid[1] == players:
        return tuple(grid)
    side = round(players**0.5)
    if side * side != players:
        raise ValueError(
            f"cannot lay N = {players} players on a square patch grid; pass a timm ViT or a square N"
        )
    return side, side


def _first_parameter(model: nn.Module) -> torch.Tensor | None:
    return next(model.parameters(), None)


def check_images(images, model: nn.Module | None = None, *, sync: bool = False) -> None:
    """Raise a ValueError/TypeError unless ``images`` is a finite floating (B, C, H, W) tensor that
    ``model`` takes: same device, the parameters' dtype (unless autocast converts), and the size and
    channels of its timm patch embedding.

    Non-finite values raise a ValueError at once on the CPU, or anywhere with ``sync=True`` (one host
    sync). On CUDA without ``sync`` they are checked on the device, so the hot path never waits: a
    NaN image then fails the call with a device-side assertion naming the problem.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a (B, C, H, W) tensor, got {type(images).__name__}")
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(
            f"images must be a floating (B, C, H, W) tensor, got shape {tuple(images.shape)} {images.dtype}"
        )
    if model is not None:
        _check_model_fit(images, model)
    if images.numel() == 0:
        return
    finite = torch.isfinite(images).all()
    message = "images contain NaN or infinite values"
    if images.device.type == "cuda" and not sync:
        torch._assert_async(finite, message)
    elif not finite:
        raise ValueError(message)


def _check_model_fit(images: torch.Tensor, model: nn.Module) -> None:
    param = _first_parameter(model)
    if param is not None:
        if param.device != images.device:
            raise ValueError(f"images are on {images.device} but the model is on {param.device}")
        autocast = torch.is_autocast_enabled(images.device.type)
        if param.is_floating_point() and param.dtype != images.dtype and not autocast:
            raise ValueError(
                f"images are {images.dtype} but the model's parameters are {param.dtype}: convert the "
                f"images with .to({param.dtype}) or run under torch.autocast"
            )
    embed = find_patch_embed(model)
    if embed is None or embed.img_size is None or getattr(embed, "dynamic_img_size", False):
        return
    want, got = tuple(embed.img_size), tuple(images.shape[-2:])
    channels = embed.proj.in_channels
    if got != want or images.shape[1] != channels:
        raise ValueError(
            f"the model takes {channels}x{want[0]}x{want[1]} images (C x H x W), "
            f"got {images.shape[1]}x{got[0]}x{got[1]}"
        )


def check_coalitions(
    coalitions, batch: int, players: int, device: torch.device, *, paired: bool
) -> torch.Tensor:
    """Validate coalitions and broadcast (M, N) to (B, M, N).

    Args:
        coalitions: bool (B, M, N), or (M, N) shared by all B images.
        batch: B. players: N. device: where the images are.
        paired: coalitions 2i and 2i+1 are meant to be complements (M must be even).
    """
    if not isinstance(coalitions, torch.Tensor) or coalitions.dtype != torch.bool:
        got = coalitions.dtype if isinstance(coalitions, torch.Tensor) else type(coalitions).__name__
        raise TypeError(f"coalitions must be a bool tensor (B, M, N) or (M, N), got {got}")
    if coalitions.dim() == 2:
        coalitions = coalitions.unsqueeze(0).expand(batch, -1, -1)
    if coalitions.dim() != 3 or coalitions.shape[0] != batch:
        raise ValueError(
            f"coalitions must be (B, M, N) with B = {batch} images, or (M, N); got {tuple(coalitions.shape)}"
        )
    if coalitions.shape[2] != players:
        raise ValueError(
            f"coalitions must be (B, M, N) = ({batch}, M, {players}) for this model and batch: they have "
            f"N = {coalitions.shape[2]} players but the model has {players} patches"
        )
    if coalitions.shape[1] == 0:
        raise ValueError("coalitions must hold at least one coalition (M >= 1)")
    if paired and coalitions.shape[1] % 2:
        raise ValueError(
            f"paired=True needs an even number of coalitions M (complementary pairs), got M = "
            f"{coalitions.shape[1]}; pass paired=False for unpaired coalitions"
        )
    if coalitions.device != device:
        raise ValueError(f"coalitions are on {coalitions.device} but images are on {device}")
    return coalitions
