"""The cooperative game an explainer sees: coalitions of patches -> the model's outputs.

A :class:`ValueFunction` maps coalitions bool (B, M, N) to values (B, M, K), here v_x(S) = the
model's logits on each image x with only the patches in S present. :func:`value_function` builds
one from a model and a batch of images: a self-explaining model's own ``coalition_values``, the
packed coalition engine for timm ViTs, or pixel masking for any other classifier. Tests and
benchmarks build them from synthetic games.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from shapkern.engine import (
    check_images,
    check_packed_model,
    check_precision,
    find_patch_embed,
    fused_coalition_forward,
)

__all__ = ["ValueFunction", "value_function"]


@dataclass
class ValueFunction:
    """A cooperative game per image: coalitions bool (B, M, N) -> values (B, M, K).

    Attributes:
        fn: the callable.
        batch: B.
        players: N.
        device: where coalitions must live.
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    batch: int
    players: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __call__(self, coalitions: torch.Tensor) -> torch.Tensor:
        return self.fn(coalitions)

    def select(self, target: torch.Tensor) -> ValueFunction:
        """The game restricted to the classes ``target`` (B, K_t) int64: values (B, M, K_t)."""

        def fn(coalitions):
            values = self.fn(coalitions)
            return values.gather(-1, target.unsqueeze(1).expand(-1, values.shape[1], -1))

        return ValueFunction(fn, self.batch, self.players, self.device)


def _is_packed_vit(model: nn.Module) -> bool:
    try:
        check_packed_model(model)
    except NotImplementedError:
        return False
    return True


class _SelfExplainingLogits(nn.Module):
    """A self-explaining model as a plain classifier: (B, C, H, W) -> its logits f(x) (B, K), for
    pixel masking (its forward returns (phi, logits, ...), a ShapleyOutput)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)[1]


def value_function(
    model: nn.Module,
    images: torch.Tensor,
    *,
    mode: str | None = None,
    baseline: str = "zeros",
    players: int | None = None,
    chunk_size: int | None = None,
    precision: str = "auto",
) -> ValueFunction:
    """The game v_x(S) = logits of ``model`` on each image x with only the patches in S present.

    Args:
        model: a self-explaining model with ``coalition_values(images, coalitions)`` (used as is,
            unless ``mode="input"``: then its logits on pixel-masked images), a timm ViT (packed
            coalition engine: tokens dropped) or any classifier (pixel masking).
        images: (B, C, H, W) on the model's device.
        mode: force ``"packed"`` or ``"input"``; default picks as above.
        baseline: pixels of absent patches in input mode: ``"zeros"``, ``"mean"`` or ``"blur"``.
        players: N for models without a timm patch embedding (input mode, square grid).
        chunk_size: (image, coalition) rows per engine pass.
        precision: ``"auto"`` or ``"fp8"`` (e4m3 GEMMs in the packed engine, forward only; see
            :func:`~shapkern.engine.fused_coalition_forward`); passed on to a self-explaining model's
            ``coalition_values`` unless ``"auto"``.

    Returns:
        A :class:`ValueFunction` with coalitions (B, M, N) -> logits (B, M, K).
    """
    check_precision(precision)  # here, not at the first call of the game
    check_images(images, model)
    embed = find_patch_embed(model)
    num = embed.num_patches if embed is not None else getattr(model, "num_players", players)
    if num is None:
        raise ValueError("the model has no timm patch embedding: pass players=N (a square patch grid)")
    if players is not None and players != num:
        raise ValueError(f"players={players} but the model has {num} patches")
    self_explaining = hasattr(model, "coalition_values")
    if self_explaining and mode in (None, "packed"):
        options = {} if precision == "auto" else {"precision": precision}

        def fn(coalitions):
            return model.coalition_values(images, coalitions, **options)

    else:
        if mode is None:
            mode = "packed" if _is_packed_vit(model) else "input"
        classifier = _SelfExplainingLogits(model) if self_explaining else model

        def fn(coalitions):
            return fused_coalition_forward(
                classifier,
                images,
                coalitions,
                mode=mode,
                baseline=baseline,
                chunk_size=chunk_size,
                precision=precision,
            )

    return ValueFunction(fn, images.shape[0], num, images.device)
