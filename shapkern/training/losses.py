"""The training objective (docs/design.md, "The self-explaining model"): L = ℓ_cls + λ ℓ_sv + μ ℓ_mask.

- ℓ_cls = CE(f(x), y), f(x) = Σ_n Φ(x)_n.
- ℓ_sv = E_S || sg[v_x(S)] - Σ_{n∈S} Φ(x)_n ||², S from the Shapley kernel (paired): Φ(x) is
  the solution of the Shapley value's weighted least-squares characterisation, so driving ℓ_sv
  down makes Φ the Shapley values of the model's own value function.
- ℓ_mask = E_S CE(v_x(S), y), or KL(sg softmax f(x) || softmax v_x(S)): trains the model on
  masked inputs so that v_x(S) is meaningful.

Only ℓ_mask needs gradients through v_x(S) (ℓ_sv's targets are stop-gradient), so the first
``grad_coalitions`` of the M coalitions run forward and backward, and the others forward only,
without keeping activations: they serve as ℓ_sv targets alone.

ℓ_sv scales with the square of the logits, which cross-entropy grows; ``sv_scale="relative"``
divides each image's squared error by a stop-gradient of its ‖f(x)‖² (plus one, so that small
logits keep the plain form), which makes the trade-off λ independent of the logit scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shapkern.coalitions import sample_coalitions
from shapkern.engine import check_precision

__all__ = [
    "MASK_LOSSES",
    "SAMPLERS",
    "SV_SCALES",
    "LossOutput",
    "ShapleyLoss",
    "default_grad_coalitions",
    "shapley_regression_loss",
]

MASK_LOSSES = ("ce", "kl", None)
SAMPLERS = ("shapley", "uniform", "bernoulli")
SV_SCALES = ("raw", "relative")


def shapley_regression_loss(
    phi: torch.Tensor,
    values: torch.Tensor,
    coalitions: torch.Tensor,
    *,
    stop_grad: bool = True,
    logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """ℓ_sv = mean over images and coalitions of || sg[v(S)] - Σ_{n∈S} Φ_n ||² (squared norm over K).

    Args:
        phi: (B, N, K) Shapley values.
        values: (B, M, K) v(S) - v(∅) of each coalition (v(∅) = 0 for a ShapleyViT).
        coalitions: bool (B, M, N).
        stop_grad: detach ``values`` (the target).
        logits: (B, K) f(x); given, each image's error is divided by sg(‖f(x)‖²) + 1 (the
            relative form, free of the logit scale).
    """
    target = values.detach() if stop_grad else values
    predicted = torch.bmm(coalitions.to(phi.dtype), phi)
    error = (target.float() - predicted.float()).square().sum(-1).mean(1)  # (B,)
    if logits is not None:
        error = error / (logits.detach().float().square().sum(-1) + 1.0)
    return error.mean()


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
        logits: (B, K) f(x). phi: (B, N, K). values: (B, M, K) v_x(S).
    """

    total: torch.Tensor
    cls: torch.Tensor
    sv: torch.Tensor
    mask: torch.Tensor
    logits: torch.Tensor
    phi: torch.Tensor
    values: torch.Tensor

    def components(self) -> dict[str, float]:
        return {
            "loss": float(self.total.detach()),
            "cls": float(self.cls),
            "sv": float(self.sv),
            "mask": float(self.mask),
        }


def default_grad_coalitions(num_coalitions: int, paired: bool = True) -> int:
    """M/4 coalitions with gradients, rounded down to a whole pair, at least one pair (or one)."""
    step = 2 if paired else 1
    return min(num_coalitions, max(step, num_coalitions // 4 // step * step))


class ShapleyLoss(nn.Module):
    """L = ℓ_cls + λ ℓ_sv + μ ℓ_mask for a :class:`shapkern.ShapleyViT`.

    Defaults match ``TrainConfig`` and ``shapkern train`` (λ = 1, μ = 1, KL mask loss, 8 paired
    coalitions, ℓ_sv's gradient through its targets).

    Args:
        lam: λ, weight of the Shapley regression loss ℓ_sv (the paper's trade-off).
        mu: μ, weight of the masked-input loss ℓ_mask.
        num_coalitions: M coalitions per image (even when paired).
        paired: sample complementary pairs (antithetic).
        stop_grad: no gradient through the target v_x(S) of ℓ_sv. Off (the default), ℓ_sv is
            lowered on the masked inputs too, which ℓ_cls does not constrain; on, only through Φ(x),
            whose sum is f(x): on digits that form loses accuracy at λ ≥ 1 (README).
        mask_loss: ``"ce"``, ``"kl"`` or None.
        method: coalition sampler, ``"shapley"`` (the Shapley kernel), ``"uniform"``, ``"bernoulli"``.
        grad_coalitions: how many of the M coalitions carry gradients (the first ones; even when
            paired); the others run forward-only as ℓ_sv targets, which needs ``stop_grad=True``.
            None (default): all M; with ``stop_grad=True``, M/4, rounded down to an even number,
            at least 2 (1 unpaired), which trains as well as all M at 0.6-0.7x the step time on
            digits (README).
        sv_scale: ``"raw"`` squared error of ℓ_sv, or ``"relative"`` (divided per image by
            sg(‖f(x)‖²) + 1).
        target_precision: the forward-only ℓ_sv targets' encoder blocks, ``"auto"`` (the model's
            dtype) or ``"fp8"`` (e4m3 GEMMs; needs stop_grad=True, grad_coalitions <
            num_coalitions, and a CPU or an sm_89+ GPU). The coalitions with gradients always run
            in the model's dtype.
    """

    def __init__(
        self,
        lam: float = 1.0,
        mu: float = 1.0,
        num_coalitions: int = 8,
        paired: bool = True,
        stop_grad: bool = False,
        mask_loss: str | None = "kl",
        method: str = "shapley",
        grad_coalitions: int | None = None,
        sv_scale: str = "raw",
        target_precision: str = "auto",
    ):
        super().__init__()
        if mask_loss not in MASK_LOSSES:
            raise ValueError(f"mask_loss must be one of {MASK_LOSSES}, got {mask_loss!r}")
        if method not in SAMPLERS:
            raise ValueError(f"method must be one of {SAMPLERS}, got {method!r}")
        if not isinstance(num_coalitions, int) or num_coalitions < 1 or (paired and num_coalitions % 2):
            raise ValueError(
                f"num_coalitions must be a positive int (even when paired=True), got {num_coalitions!r}"
            )
        for name, value in (("lam", lam), ("mu", mu)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if grad_coalitions is None:
            grad_coalitions = default_grad_coalitions(num_coalitions, paired) if stop_grad else num_coalitions
        if not (
            isinstance(grad_coalitions, int)
            and 0 < grad_coalitions <= num_coalitions
            and not (paired and grad_coalitions % 2)
        ):
            raise ValueError(
                f"grad_coalitions must be an int in 1..num_coalitions={num_coalitions} (even when paired), "
                f"got {grad_coalitions!r}"
            )
        if grad_coalitions < num_coalitions and not stop_grad:
            raise ValueError(
                "stop_grad=False needs every coalition to carry gradients (grad_coalitions = "
                "num_coalitions): ℓ_sv's gradient through only some targets collapses training (digits); "
                "fewer graded coalitions need stop_grad=True (--stop-grad)"
            )
        if sv_scale not in SV_SCALES:
            raise ValueError(f"sv_scale must be one of {SV_SCALES}, got {sv_scale!r}")
        check_precision(target_precision)
        if target_precision != "auto" and grad_coalitions == num_coalitions:
            raise ValueError(
                f"target_precision={target_precision!r} applies to the forward-only ℓ_sv targets, and "
                f"all {num_coalitions} coalitions carry gradients: forward-only targets need stop_grad=True "
                "(--stop-grad) and grad_coalitions < num_coalitions"
            )
        self.lam, self.mu = float(lam), float(mu)
        self.num_coalitions, self.paired, self.stop_grad = num_coalitions, paired, stop_grad
        self.mask_loss, self.method = mask_loss, method
        self.grad_coalitions, self.sv_scale = grad_coalitions, sv_scale
        self.target_precision = target_precision

    def sample(self, batch: int, players: int, generator: torch.Generator | None = None, device=None):
        """bool (B, M, N) coalitions from this loss's sampler."""
        return sample_coalitions(
            batch,
            self.num_coalitions,
            players,
            method=self.method,
            paired=self.paired,
            generator=generator,
            device=device,
        )

    def forward(
        self,
        model: nn.Module,
        images: torch.Tensor,
        targets: torch.Tensor,
        coalitions: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """One loss evaluation: Φ, f and v_x(S) of the gradient-carrying coalitions from one packed
        pass of the engine, and the forward-only ℓ_sv targets from a second pass without autograd.

        Args:
            model: a ShapleyViT, or one wrapped in DistributedDataParallel: it is called as
                ``model(images, coalitions, paired=...)`` and returns a ShapleyOutput.
            images: (B, C, H, W); targets: (B,) int64.
            coalitions: bool (B, M, N); sampled with ``generator`` when None.
        """
        shapley_vit = getattr(model, "module", model)  # unwrap DistributedDataParallel
        players = getattr(shapley_vit, "num_players", None)
        if players is None or not hasattr(shapley_vit, "forward_coalitions"):
            raise TypeError(
                f"ShapleyLoss needs a self-explaining model (shapkern.ShapleyViT, optionally in "
                f"DistributedDataParallel), got {type(shapley_vit).__name__}; wrap a timm ViT as "
                "ShapleyViT(backbone, num_classes)"
            )
        _check_targets(targets, images.shape[0], shapley_vit.num_classes)
        if coalitions is None:
            coalitions = self.sample(images.shape[0], players, generator, device=images.device)
        if coalitions.dim() == 2:
            coalitions = coalitions.unsqueeze(0).expand(images.shape[0], -1, -1)
        if coalitions.dim() != 3 or coalitions.shape[0] != images.shape[0] or coalitions.shape[2] != players:
            raise ValueError(
                f"coalitions must be (B, M, N) = ({images.shape[0]}, M, {players}) for this model and batch, "
                f"got {tuple(coalitions.shape)}"
            )
        graded = coalitions[:, : self.grad_coalitions]
        out = model(images, graded, paired=self.paired)  # through DDP's forward
        sv_targets = out.values
        if self.grad_coalitions < coalitions.shape[1]:  # forward-only ℓ_sv targets: no activations kept
            with torch.no_grad():
                rest = shapley_vit.coalition_values(
                    images,
                    coalitions[:, self.grad_coalitions :],
                    paired=self.paired,
                    precision=self.target_precision,
                )
            sv_targets = torch.cat([out.values.detach(), rest.to(out.values.dtype)], dim=1)
        cls = F.cross_entropy(out.logits, targets)
        scale = out.logits if self.sv_scale == "relative" else None
        sv = shapley_regression_loss(out.phi, sv_targets, coalitions, stop_grad=self.stop_grad, logits=scale)
        total = cls + self.lam * sv
        if self.mask_loss == "ce":
            mask = F.cross_entropy(out.values.flatten(0, 1), targets.repeat_interleave(graded.shape[1]))
        elif self.mask_loss == "kl":
            teacher = out.logits.detach().log_softmax(-1).unsqueeze(1).expand_as(out.values)
            mask = (
                F.kl_div(out.values.log_softmax(-1), teacher, log_target=True, reduction="none")
                .sum(-1)
                .mean()
            )
        else:
            mask = torch.zeros((), device=images.device)
        if self.mask_loss is not None:
            total = total + self.mu * mask
        return LossOutput(
            total=total,
            cls=cls.detach(),
            sv=sv.detach(),
            mask=mask.detach(),
            logits=out.logits,
            phi=out.phi,
            values=out.values,
        )
