"""One evaluation of the objective: the model's passes that :class:`ShapleyLoss` needs, then the loss.

- The coalitions that carry gradients run with Φ(x) and f(x) in one packed pass of the engine,
  through the model as given (DistributedDataParallel's forward, when wrapped).
- The others (stop-gradient ℓ_sv only) are ℓ_sv targets alone: they run forward-only, without
  autograd, through the model's value function, in ``loss.target_precision``.
"""

from __future__ import annotations

import torch
from torch import nn

from shapkern.engine import check_coalitions
from shapkern.games import SelfExplaining
from shapkern.training.losses import LossOutput, ShapleyLoss

__all__ = ["self_explaining", "shapley_step"]


def self_explaining(model: nn.Module) -> SelfExplaining:
    """The self-explaining model ``model`` is or wraps (DistributedDataParallel); TypeError otherwise."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if not isinstance(inner, SelfExplaining):
        raise TypeError(
            f"shapley_step needs a self-explaining model (shapkern.ShapleyViT, optionally in "
            f"DistributedDataParallel), got {type(inner).__name__}; wrap a timm ViT as "
            "ShapleyViT(backbone, num_classes)"
        )
    return inner


def shapley_step(
    model: nn.Module,
    loss: ShapleyLoss,
    images: torch.Tensor,
    targets: torch.Tensor,
    coalitions: torch.Tensor,
    *,
    paired: bool = True,
) -> LossOutput:
    """``loss`` on ``model``'s outputs for one batch: what a hand-written training loop calls
    before ``out.total.backward()``.

    Args:
        model: a self-explaining model (:class:`shapkern.ShapleyViT`), or one wrapped in
            DistributedDataParallel; called as ``model(images, coalitions, paired=paired)``.
        loss: the objective; its ``grad_coalitions`` and ``target_precision`` say which coalitions
            run with gradients and how the others run.
        images: (B, C, H, W). targets: (B,) int64 class indices.
        coalitions: bool (B, M, N), or (M, N) shared by the batch, e.g. from
            :func:`~shapkern.sample_coalitions` or a :class:`~shapkern.coalitions.CoalitionSampler`.
        paired: coalitions 2i and 2i+1 are complements (as the samplers draw them by default).

    Returns:
        The :class:`LossOutput`: total, its components, and Φ, f(x) and v_x(S) of the graded coalitions.
    """
    inner = self_explaining(model)
    coalitions = check_coalitions(
        coalitions, images.shape[0], inner.num_players, images.device, paired=paired
    )
    graded = loss.graded(coalitions.shape[1], paired)
    outputs = model(images, coalitions[:, :graded], paired=paired)
    sv_targets = None
    if graded < coalitions.shape[1]:  # forward-only ℓ_sv targets: no activations kept
        with torch.no_grad():
            values = inner.coalition_forward(images, precision=loss.target_precision)
            sv_targets = values(coalitions[:, graded:], paired=paired)
    return loss(outputs, targets, coalitions, sv_targets=sv_targets)
