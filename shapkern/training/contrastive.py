"""The image-text objective (docs/design.md, "Image-text matching"): L = ℓ_con + λ ℓ_sv + μ ℓ_mask.

For a batch of B images and their B captions, with s(x, t) = exp(τ) ⟨f(x), e_t⟩ / ‖f(x)‖ (+ b), and the
game v_{x,t}(S) = exp(τ) ⟨f(x_S), e_t⟩ / ‖f(x)‖ (+ b) (models/image_text.py):

- ℓ_con: CLIP's softmax loss (cross-entropy over the texts of each image and over the images of each
  text, averaged) or SigLIP's sigmoid loss (−log σ(±s) of every pair, + on the diagonal, summed over
  texts, averaged over images), on the full images.
- ℓ_sv = E_{x,S} mean_t (v_{x,t}(S) − b − Σ_{n∈S} exp(τ) ⟨Φ(x)_n, e_t⟩ / ‖f(x)‖)²: the Shapley
  regression of the masked images' values with the batch's texts (B × M × B values). It is the
  embedding's ℓ_sv seen through the texts, relative to ‖f(x)‖² (which enters without gradient), so
  it does not depend on the embedding's scale; its gradient flows into both sides, as the
  classification loss's.
- ℓ_mask: KL(sg p(· | x) ‖ p(· | x_S)) between the full and the masked image's distributions over
  the batch's texts (softmax), or the mean KL of the pairs' Bernoulli distributions (sigmoid).

ℓ_sv and ℓ_mask train the image tower's game; the text embeddings, the temperature and ‖f(x)‖ enter
them without gradient (the contrastive loss trains those), so they cannot be lowered by turning the
texts away from the errors. λ = μ = 0 is the contrastive loss alone: the step then runs no coalitions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shapkern.engine import check_coalitions
from shapkern.models import CONTRASTIVES, Contrastive, ImageTextOutput
from shapkern.training.losses import MASK_LOSSES, LossOutput, MaskLoss

__all__ = ["ContrastiveLoss", "contrastive_loss", "image_text_step"]


def contrastive_loss(sims: torch.Tensor, contrastive: Contrastive = "softmax") -> torch.Tensor:
    """ℓ_con of the similarities (B, B) of B images with their B texts (pair b on the diagonal)."""
    target = torch.arange(sims.shape[0], device=sims.device)
    if contrastive == "softmax":
        return (F.cross_entropy(sims, target) + F.cross_entropy(sims.T, target)) / 2
    signs = 2 * torch.eye(sims.shape[0], device=sims.device) - 1
    return -F.logsigmoid(signs * sims).sum(1).mean()


def _mask_kl(full: torch.Tensor, masked: torch.Tensor, contrastive: Contrastive) -> torch.Tensor:
    """KL of the full images' text distributions (B, K) (the stop-gradient teacher) to the masked
    ones' (B, M, K), mean over images and coalitions."""
    teacher = full.detach().unsqueeze(1).expand_as(masked)
    if contrastive == "softmax":
        kl = F.kl_div(masked.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="none")
        return kl.sum(-1).mean()
    p, log_p, log_q = teacher.sigmoid(), F.logsigmoid(teacher), F.logsigmoid(masked)
    log_not_p, log_not_q = F.logsigmoid(-teacher), F.logsigmoid(-masked)
    return (p * (log_p - log_q) + (1 - p) * (log_not_p - log_not_q)).mean()


class ContrastiveLoss(nn.Module):
    """L = ℓ_con + λ ℓ_sv + μ ℓ_mask from a self-explaining image-text model's outputs (pure: it calls
    no model; :func:`image_text_step` runs the model for it).

    Args:
        lam: λ, the weight of ℓ_sv. mu: μ, the weight of ℓ_mask.
        contrastive: ``"softmax"`` or ``"sigmoid"`` (the model's own, see ShapleyCLIP).
        mask_loss: ``"kl"`` or None (``"ce"`` has no meaning without classes).
    """

    def __init__(
        self,
        lam: float = 1.0,
        mu: float = 1.0,
        *,
        contrastive: Contrastive = "softmax",
        mask_loss: MaskLoss | None = "kl",
    ):
        super().__init__()
        for name, value in (("lam", lam), ("mu", mu)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if contrastive not in CONTRASTIVES:
            raise ValueError(f"contrastive must be one of {CONTRASTIVES}, got {contrastive!r}")
        if mask_loss not in MASK_LOSSES or mask_loss == "ce":
            raise ValueError(f"mask_loss of image-text training must be 'kl' or None, got {mask_loss!r}")
        self.lam, self.mu, self.contrastive, self.mask_loss = float(lam), float(mu), contrastive, mask_loss

    @property
    def uses_coalitions(self) -> bool:
        """Whether ℓ_sv or ℓ_mask is on: the coalitions need a pass of the model."""
        return self.lam > 0 or (self.mu > 0 and self.mask_loss is not None)

    def forward(self, outputs: ImageTextOutput, coalitions: torch.Tensor | None) -> LossOutput:
        """The loss of one step: ``outputs`` of the model on B images and their B texts (with the
        coalitions bool (B, M, N) when :attr:`uses_coalitions`)."""
        phi, image, values, text, scale, bias = outputs
        if text is None or text.shape[0] != image.shape[0]:
            raise ValueError("outputs must hold one text per image (the batch's captions)")
        sims = outputs.similarity()
        con = contrastive_loss(sims, self.contrastive)
        zero = torch.zeros((), device=image.device)
        if not self.uses_coalitions:
            return LossOutput(con, con.detach(), zero, zero, logits=sims, phi=phi, values=phi[:, :0])
        if values is None or coalitions is None:
            raise ValueError("λ > 0 or μ > 0 needs the coalitions and the outputs of a pass with them")
        coalitions = check_coalitions(coalitions, phi.shape[0], phi.shape[1], phi.device, paired=False)
        # (D, K) and (B, 1, 1): the texts, the temperature and ‖f(x)‖ as constants
        project, norm = scale.detach() * text.detach().T, outputs.norm.detach().float().unsqueeze(1)
        error = (values - torch.bmm(coalitions.to(phi.dtype), phi)).float() / norm @ project
        sv = error.square().mean()
        total = con + self.lam * sv
        mask = zero
        if self.mask_loss is not None:
            masked = values.float() / norm @ project + (0 if bias is None else bias.detach())
            mask = _mask_kl(sims, masked, self.contrastive)
            total = total + self.mu * mask
        parts = (con.detach(), sv.detach(), mask.detach())
        return LossOutput(total, *parts, logits=sims, phi=phi, values=values)


def image_text_step(
    model: nn.Module,
    loss: ContrastiveLoss,
    images: torch.Tensor,
    tokens: torch.Tensor,
    coalitions: torch.Tensor,
    *,
    paired: bool = True,
) -> LossOutput:
    """``loss`` on the model's outputs for B images and their B captions (tokens (B, L)): one packed
    pass of the image tower (the coalitions only when ℓ_sv or ℓ_mask is on) and the text encoder,
    through the model as given (DistributedDataParallel's forward, when wrapped). ``logits`` of the
    result are the similarities (B, B), caption b of image b on the diagonal."""
    used = coalitions if loss.uses_coalitions else None
    return loss(model(images, tokens, used, paired=paired), coalitions)
