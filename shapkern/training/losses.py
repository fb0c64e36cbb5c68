"""The training objective (docs/design.md, "The self-explaining model"): L = ℓ_cls + λ ℓ_sv + μ ℓ_mask.

- ℓ_cls = CE(f(x), y), f(x) = Σ_n Φ(x)_n.
- ℓ_sv = E_S || v_x(S) - Σ_{n∈S} Φ(x)_n ||², S from the coalition sampler (the Shapley kernel,
  paired, by default): Φ(x) is the solution of the Shapley value's weighted least-squares
  characterisation, so driving ℓ_sv down makes Φ the Shapley values of the model's own value
  function. By default (since 0.2.0) its gradient flows into both sides: ℓ_sv is lowered on the
  masked inputs too, which ℓ_cls does not constrain. ``stop_grad=True`` is the earlier form,
  sg[v_x(S)], which can only move Φ(x) (whose sum ℓ_cls trains) and loses accuracy at λ ≥ 1.
- ℓ_mask = E_S CE(v_x(S), y), or KL(sg softmax f(x) || softmax v_x(S)): trains the model on
  masked inputs so that v_x(S) is meaningful.

The loss is pure: :class:`ShapleyLoss` takes the model's outputs (Φ, f and v_x(S) of the coalitions
that carry gradients) and the coalitions, and calls no model; :mod:`shapkern.training.step` runs
the model for it. With the stop gradient, only the first ``grad_coalitions`` of the M coalitions
need gradients (for ℓ_mask); the others serve as ℓ_sv targets alone, computed forward-only
without keeping activations (``sv_targets``), optionally in fp8 (``target_precision``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from shapkern.engine import Precision, check_coalitions, check_precision
from shapkern.models import ShapleyOutput

__all__ = [
    "MASK_LOSSES",
    "SV_SCALES",
    "LossOutput",
    "ShapleyLoss",
    "default_grad_coalitions",
    "graded_coalitions",
    "shapley_regression_loss",
]

MaskLoss = Literal["ce", "kl"]
MASK_LOSSES: tuple[MaskLoss | None, ...] = (*get_args(MaskLoss), None)  # None: no ℓ_mask


def _relative(phi: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    # sg(‖f(x)‖²) + 1: λ independent of the logit scale; the + 1 keeps the plain form for small logits.
    return logits.detach().float().square().sum(-1) + 1.0


def _player(phi: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    # One patch's mean squared value sg(‖Φ(x)‖²)/N. ℓ_sv exceeds its floor by c‖Φ − φ‖² (c = 1/2 −
    # E[z_i z_j] = 0.15 for the Shapley kernel at N = 16), so the ratio is c·N times the squared
    # relative error of Φ: the scale of the explanation, not of the logits (‖f(x)‖² ≈ 4-7‖Φ(x)‖²
    # on digits). A small ε instead of + 1: with + 1 a small-logit model is back to the raw form.
    return phi.detach().float().square().mean(1).sum(-1) + 1e-3


def _centered(phi: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    # "player" with Φ centred over classes first: softmax ignores a shift common to all classes,
    # and under a strong ℓ_sv that common part grows (nothing but ℓ_sv's noisy gradient acts on it),
    # inflating ‖Φ‖² and so weakening "player"'s ℓ_sv. The error itself stays uncentred.
    phi = phi.detach().float()
    return (phi - phi.mean(-1, keepdim=True)).square().mean(1).sum(-1) + 1e-3


# ℓ_sv grows with the square of the logits, which cross-entropy grows. sv_scale -> the stop-gradient
# divisor (B,) of each image's ℓ_sv from Φ (B, N, K) and f(x) (B, K); "raw": none. "player" and
# "centered" are experimental (benchmarks/experiments/train_sweeps).
SvScale = Literal["raw", "relative", "player", "centered"]
SV_NORMALISERS: dict[SvScale, Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None] = {
    "raw": None,
    "relative": _relative,
    "player": _player,
    "centered": _centered,
}
SV_SCALES: tuple[SvScale, ...] = get_args(SvScale)


def shapley_regression_loss(
    phi: torch.Tensor,
    values: torch.Tensor,
    coalitions: torch.Tensor,
    *,
    stop_grad: bool = False,
    sv_scale: SvScale = "raw",
    logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """ℓ_sv = mean over images and coalitions of || v(S) - Σ_{n∈S} Φ_n ||² (squared norm over K).

    Args:
        phi: (B, N, K) Shapley values.
        values: (B, M, K) v(S) - v(∅) of each coalition (v(∅) = 0 for a ShapleyViT).
        coalitions: bool (B, M, N).
        stop_grad: detach ``values`` (the target).
        sv_scale: each image's squared error as is (``"raw"``), or divided by a stop-gradient scale:
            ``"relative"`` sg(‖f(x)‖²) + 1 (needs ``logits``), ``"player"`` sg(‖Φ(x)‖²)/N + 1e-3,
            ``"centered"`` the same with Φ centred over classes.
        logits: (B, K) f(x), for ``sv_scale="relative"`` only (default Σ_n Φ_n, which f(x) is for a
            self-explaining model).
    """
    if sv_scale not in SV_NORMALISERS:
        raise ValueError(f"sv_scale must be one of {SV_SCALES}, got {sv_scale!r}")
    if logits is not None and sv_scale != "relative":  # once, passing logits chose "relative"
        raise ValueError(f"logits apply to sv_scale='relative' only, got sv_scale={sv_scale!r}")
    target = values.detach() if stop_grad else values
    predicted = torch.bmm(coalitions.to(phi.dtype), phi)
    error = (target.float() - predicted.float()).square().sum(-1).mean(1)  # (B,)
    normaliser = SV_NORMALISERS[sv_scale]
    if normaliser is not None:
        error = error / normaliser(phi, phi.sum(1) if logits is None else logits)
    return error.mean()


def default_grad_coalitions(num_coalitions: int, paired: bool = True) -> int:
    """M/4 coalitions with gradients, rounded down to a whole pair, at least one pair (or one)."""
    step = 2 if paired else 1
    return min(num_coalitions, max(step, num_coalitions // 4 // step * step))


def graded_coalitions(
    num: int, *, paired: bool, stop_grad: bool, grad_coalitions: int | None, target_precision: Precision
) -> int:
    """How many of ``num`` coalitions carry gradients: ``grad_coalitions``, or by default all
    (M/4 in whole pairs with ``stop_grad``). ValueError for a number the options cannot take."""
    if paired and num % 2:
        raise ValueError(f"num_coalitions must be even when paired (complementary pairs), got {num}")
    if grad_coalitions is None:
        grad_coalitions = default_grad_coalitions(num, paired) if stop_grad else num
    if not (
        isinstance(grad_coalitions, int)
        and 0 < grad_coalitions <= num
        and not (paired and grad_coalitions % 2)
    ):
        raise ValueError(
            f"grad_coalitions must be an int in 1..num_coalitions={num} (even when paired), "
            f"got {grad_coalitions!r}"
        )
    if grad_coalitions < num and not stop_grad:
        raise ValueError(
            "stop_grad=False needs every coalition to carry gradients (grad_coalitions = "
            "num_coalitions): ℓ_sv's gradient through only some targets collapses training (digits); "
            "fewer graded coalitions need stop_grad=True (--stop-grad)"
        )
    if target_precision != "auto" and grad_coalitions == num:
        raise ValueError(
            f"target_precision={target_precision!r} applies to the forward-only ℓ_sv targets, and "
            f"all {num} coalitions carry gradients: forward-only targets need stop_grad=True "
            "(--stop-grad) and grad_coalitions < num_coalitions"
        )
    return grad_coalitions


def _check_targets(targets: torch.Tensor, batch: int, classes: int) -> None:
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64 or targets.shape != (batch,):
        got = (
            f"{targets.dtype} {tuple(targets.shape)}"
            if isinstance(targets, torch.Tensor)
            else type(targets).__name__
        )
        raise ValueError(f"targets must be int64 class indices of shape ({batch},), got {got}")
    in_range = ((targets >= 0) & (targets < classes)).all()
    message = f"targets must lie in 0..{classes - 1}: the model has {classes} classes"
    if targets.device.type != "cpu":
        torch._assert_async(in_range, message)  # no host sync on the training hot path
    elif not in_range:
        raise ValueError(f"{message}, got values {int(targets.min())}..{int(targets.max())}")


@dataclass
class LossOutput:
    """The total loss, its components (detached) and the model outputs of the step.

    Attributes:
        total: scalar to backpropagate.
        cls, sv, mask: the components ℓ_cls, ℓ_sv, ℓ_mask (detached scalars; mask is 0 when off).
        logits: (B, K) f(x). phi: (B, N, K). values: (B, G, K) v_x(S) of the coalitions with gradients.
    """

    total: torch.Tensor
    cls: torch.Tensor
    sv: torch.Tensor
    mask: torch.Tensor
    logits: torch.Tensor
    phi: torch.Tensor
    values: torch.Tensor

    def components(self) -> dict[str, float]:
        parts = {"loss": self.total.detach(), "cls": self.cls, "sv": self.sv, "mask": self.mask}
        return {name: float(value) for name, value in parts.items()}


class ShapleyLoss(nn.Module):
    """L = ℓ_cls + λ ℓ_sv + μ ℓ_mask from a self-explaining model's outputs.

    ``loss(outputs, targets, coalitions)``; :func:`shapkern.training.shapley_step` runs the model
    and the loss in one call. Defaults match ``TrainConfig`` and ``shapkern train`` (λ = 1, μ = 1,
    KL mask loss, ℓ_sv's gradient through its targets, raw squared error).

    Args:
        lam: λ, weight of the Shapley regression loss ℓ_sv (the paper's trade-off).
        mu: μ, weight of the masked-input loss ℓ_mask.
        stop_grad: no gradient through the target v_x(S) of ℓ_sv. Off (the default), ℓ_sv is
            lowered on the masked inputs too, which ℓ_cls does not constrain; on, only through Φ(x),
            whose sum is f(x): on digits that form loses accuracy at λ ≥ 1 (README).
        mask_loss: ``"ce"``, ``"kl"`` or None.
        sv_scale: ℓ_sv's normaliser, one of SV_SCALES (see :func:`shapley_regression_loss`).
        grad_coalitions: how many of the M coalitions carry gradients (the first ones; even when
            paired); the others run forward-only as ℓ_sv targets, which needs ``stop_grad=True``.
            None (default): all M; with ``stop_grad=True``, M/4, rounded down to an even number,
            at least 2 (1 unpaired), which trains as well as all M at 0.6-0.7x the step time on
            digits (README). See :meth:`graded`.
        target_precision: the forward-only ℓ_sv targets' encoder blocks, ``"auto"`` (the model's
            dtype) or ``"fp8"`` (e4m3 GEMMs; needs stop_grad=True, grad_coalitions <
            num_coalitions, and a CPU or an sm_89+ GPU). The coalitions with gradients always run
            in the model's dtype.
    """

    def __init__(
        self,
        lam: float = 1.0,
        mu: float = 1.0,
        *,
        stop_grad: bool = False,
        mask_loss: MaskLoss | None = "kl",
        sv_scale: SvScale = "raw",
        grad_coalitions: int | None = None,
        target_precision: Precision = "auto",
    ):
        super().__init__()
        if mask_loss not in MASK_LOSSES:
            raise ValueError(f"mask_loss must be one of {MASK_LOSSES}, got {mask_loss!r}")
        for name, value in (("lam", lam), ("mu", mu)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if sv_scale not in SV_SCALES:
            raise ValueError(f"sv_scale must be one of {SV_SCALES}, got {sv_scale!r}")
        check_precision(target_precision)
        if target_precision != "auto" and not stop_grad:
            raise ValueError(
                f"target_precision={target_precision!r} applies to the forward-only ℓ_sv targets, and with "
                "stop_grad=False all coalitions carry gradients: forward-only targets need stop_grad=True "
                "(--stop-grad) and grad_coalitions < num_coalitions"
            )
        self.lam, self.mu, self.stop_grad = float(lam), float(mu), stop_grad
        self.mask_loss, self.sv_scale = mask_loss, sv_scale
        self.grad_coalitions, self.target_precision = grad_coalitions, target_precision

    def graded(self, num: int, paired: bool = True) -> int:
        """How many of ``num`` coalitions carry gradients (``grad_coalitions`` resolved); ValueError
        when this loss's options cannot take ``num``."""
        return graded_coalitions(
            num,
            paired=paired,
            stop_grad=self.stop_grad,
            grad_coalitions=self.grad_coalitions,
            target_precision=self.target_precision,
        )

    def forward(
        self,
        outputs: ShapleyOutput,
        targets: torch.Tensor,
        coalitions: torch.Tensor,
        *,
        sv_targets: torch.Tensor | None = None,
    ) -> LossOutput:
        """The loss of one step.

        Args:
            outputs: the model's ShapleyOutput (phi (B, N, K), logits (B, K), values (B, G, K)) on
                the coalitions that carry gradients.
            targets: (B,) int64 class indices.
            coalitions: bool (B, M, N) (or (M, N)), all M: the G graded ones first.
            sv_targets: (B, M - G, K) v_x(S) of the other coalitions, computed without autograd
                (needs ``stop_grad=True``); None when G = M.
        """
        if isinstance(outputs, nn.Module):
            raise TypeError(
                "ShapleyLoss takes the model's outputs, not the model: shapley_step(model, loss, images, "
                "targets, coalitions) runs the model, then the loss"
            )
        phi, logits, values = outputs
        if values is None:
            raise ValueError("outputs.values is None: the outputs must come from a pass with the coalitions")
        coalitions = check_coalitions(coalitions, phi.shape[0], phi.shape[1], phi.device, paired=False)
        _check_targets(targets, phi.shape[0], logits.shape[-1])
        sv_target = self._sv_target(values, coalitions, sv_targets)
        cls = F.cross_entropy(logits, targets)
        sv = shapley_regression_loss(
            phi,
            sv_target,
            coalitions,
            stop_grad=self.stop_grad,
            sv_scale=self.sv_scale,
            logits=logits if self.sv_scale == "relative" else None,
        )
        total = cls + self.lam * sv
        mask = self._mask(logits, values, targets)
        if self.mask_loss is not None:
            total = total + self.mu * mask
        return LossOutput(
            total, cls.detach(), sv.detach(), mask.detach(), logits=logits, phi=phi, values=values
        )

    def _sv_target(
        self, values: torch.Tensor, coalitions: torch.Tensor, sv_targets: torch.Tensor | None
    ) -> torch.Tensor:
        """v_x(S) of all M coalitions: ``values`` (B, G, K), then the forward-only ``sv_targets``."""
        rest = 0 if sv_targets is None else sv_targets.shape[1]
        graded = coalitions.shape[1] - rest
        if values.shape[:2] != (coalitions.shape[0], graded):
            raise ValueError(
                f"outputs.values must be (B, G, K) = ({coalitions.shape[0]}, {graded}, K): v_x(S) of the "
                f"{graded} coalitions with gradients, of the {coalitions.shape[1]} given ({rest} "
                f"forward-only sv_targets), got {tuple(values.shape)}"
            )
        if sv_targets is None:
            return values
        if not self.stop_grad:
            raise ValueError(
                "sv_targets (forward-only ℓ_sv targets) need stop_grad=True: with ℓ_sv's gradient "
                "through its targets, every coalition must carry gradients"
            )
        return torch.cat([values.detach(), sv_targets.to(values.dtype)], dim=1)

    def _mask(self, logits: torch.Tensor, values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """ℓ_mask over the coalitions with gradients, values (B, G, K); 0 when off."""
        if self.mask_loss == "ce":
            return F.cross_entropy(values.flatten(0, 1), targets.repeat_interleave(values.shape[1]))
        if self.mask_loss == "kl":
            teacher = logits.detach().log_softmax(-1).unsqueeze(1).expand_as(values)
            return F.kl_div(values.log_softmax(-1), teacher, log_target=True, reduction="none").sum(-1).mean()
        return torch.zeros((), device=logits.device)
