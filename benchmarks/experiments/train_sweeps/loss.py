"""Experimental ℓ_sv normalisers (candidates for the library's ``sv_scale``) and the loss that
applies them: :data:`EXTRA_SCALES` and :class:`SweepLoss`."""

from __future__ import annotations

import dataclasses

import torch

from shapkern.training.losses import ShapleyLoss

__all__ = ["EXTRA_SCALES", "SweepLoss"]


def _player_scale(phi: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    # One patch's mean squared value ‖Φ(x)‖²/N. ℓ_sv exceeds its floor by c‖Φ − φ‖² (c = 1/2 −
    # E[z_i z_j] = 0.15 for the Shapley kernel at N = 16), so the ratio is c·N times the squared
    # relative error of Φ: the scale of the explanation, not of the logits (‖f(x)‖² ≈ 4-7‖Φ(x)‖²
    # on digits). A small ε instead of + 1: with + 1 a small-logit model is back to the raw form.
    return phi.detach().float().square().mean(1).sum(-1) + 1e-3


def _centered_player_scale(phi: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    # The same, with Φ centred over classes first: softmax ignores a shift common to all classes,
    # and under a strong ℓ_sv that common part grows (AdamW moves every direction, and nothing but
    # ℓ_sv's noisy gradient acts on it), inflating ‖Φ‖² and so weakening "player"'s ℓ_sv. The
    # error itself stays uncentred: the common part must be additive as well.
    phi = phi.detach().float()
    return (phi - phi.mean(-1, keepdim=True)).square().mean(1).sum(-1) + 1e-3


EXTRA_SCALES = {  # name -> sg denominator of each image's ℓ_sv
    "player": _player_scale,
    "centered": _centered_player_scale,
}


class SweepLoss(ShapleyLoss):
    """ShapleyLoss whose ℓ_sv is divided per image by a stop-gradient scale, one of EXTRA_SCALES.

    The library's ℓ_sv is switched off (λ = 0 in the parent) and the normalised one added, so the
    step is otherwise the library's. Needs every coalition to carry gradients (its values are the
    ℓ_sv targets read back from the parent's output).
    """

    def __init__(self, lam: float, scale: str, **kwargs):
        kwargs.setdefault("grad_coalitions", kwargs.get("num_coalitions", 8))
        super().__init__(0.0, **kwargs)
        if scale not in EXTRA_SCALES:
            raise ValueError(f"scale must be one of {tuple(EXTRA_SCALES)}, got {scale!r}")
        if self.grad_coalitions != self.num_coalitions:
            raise ValueError("SweepLoss needs grad_coalitions == num_coalitions")
        self.sv_lam, self.scale = float(lam), scale

    def forward(self, model, images, targets, coalitions=None, *, generator=None):
        if coalitions is None:
            players = getattr(model, "module", model).num_players
            coalitions = self.sample(images.shape[0], players, generator, device=images.device)
        out = super().forward(model, images, targets, coalitions, generator=generator)
        coalitions = coalitions.expand(images.shape[0], -1, -1) if coalitions.dim() == 2 else coalitions
        predicted = torch.bmm(coalitions.to(out.phi.dtype), out.phi).float()
        error = (out.values.detach().float() - predicted).square().sum(-1).mean(1)
        sv = (error / EXTRA_SCALES[self.scale](out.phi, out.values)).mean()
        return dataclasses.replace(out, total=out.total + self.sv_lam * sv, sv=sv.detach())
