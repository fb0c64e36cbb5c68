"""The training objective of design.md §2: L = ℓ_cls + λ ℓ_sv + μ ℓ_mask.

- ℓ_cls = CE(f(x), y), f(x) = Σ_n Φ(x)_n.
- ℓ_sv = E_S || sg[v_x(S)] - Σ_{n∈S} Φ(x)_n ||², S from the Shapley kernel (paired): Φ(x) is
  the solution of the Shapley value's weighted least-squares characterisation, so driving ℓ_sv
  down makes Φ the Shapley values of the model's own value function.
- ℓ_mask = E_S CE(v_x(S), y), or KL(sg softmax f(x) || softmax v_x(S)): trains the model on
  masked inputs so that v_x(S) is meaningful.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shapkern.coalitions import sample_coalitions
from shapkern.models import ShapleyOutput

__all__ = ["MASK_LOSSES", "LossOutput", "ShapleyLoss", "seeded_coalitions", "shapley_regression_loss"]

MASK_LOSSES = ("ce", "kl", None)


def shapley_regression_loss(
    phi: torch.Tensor, values: torch.Tensor, coalitions: torch.Tensor, *, stop_grad: bool = True
) -> torch.Tensor:
    """ℓ_sv = mean over images and coalitions of || sg[v(S)] - Σ_{n∈S} Φ_n ||² (squared norm over K).

    Args:
        phi: (B, N, K) Shapley values.
        values: (B, M, K) v(S) - v(∅) of each coalition (v(∅) = 0 for a ShapleyViT).
        coalitions: bool (B, M, N).
        stop_grad: detach ``values`` (the target).
    """
    target = values.detach() if stop_grad else values
    predicted = torch.bmm(coalitions.to(phi.dtype), phi)
    return (target.float() - predicted.float()).square().sum(-1).mean()


def seeded_coalitions(
    indices: torch.Tensor,
    *,
    seed: int,
    epoch: int,
    num: int,
    players: int,
    method: str = "shapley",
    paired: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Coalitions of each sample from its own generator, seeded by (seed, epoch, sample index).

    They do not depend on the batch a sample lands in nor on the number of processes.

    Args:
        indices: (B,) int dataset indices.

    Returns:
        bool (B, M, N) on ``device``.
    """
    gen = torch.Generator()
    out = []
    for index in indices.tolist():  # B small generators: sampling only, no coalition evaluation
        gen.manual_seed(((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (2**63 - 1))
        out.append(sample_coalitions(1, num, players, method=method, paired=paired, generator=gen))
    return torch.cat(out).to(device)


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


class ShapleyLoss(nn.Module):
    """L = ℓ_cls + λ ℓ_sv + μ ℓ_mask for a :class:`shapkern.ShapleyViT` (design.md §2).

    Args:
        lam: λ, weight of the Shapley regression loss ℓ_sv (the paper's trade-off).
        mu: μ, weight of the masked-input loss ℓ_mask.
        num_coalitions: M coalitions per image (even when paired).
        paired: sample complementary pairs (antithetic).
        stop_grad: no gradient through the target v_x(S) of ℓ_sv (off only for ablation).
        mask_loss: ``"ce"``, ``"kl"`` or None.
        method: coalition sampler, ``"shapley"`` (the Shapley kernel), ``"uniform"``, ``"bernoulli"``.
    """

    def __init__(
        self,
        lam: float = 1.0,
        mu: float = 1.0,
        num_coalitions: int = 32,
        paired: bool = True,
        stop_grad: bool = True,
        mask_loss: str | None = "ce",
        method: str = "shapley",
    ):
        super().__init__()
        if mask_loss not in MASK_LOSSES:
            raise ValueError(f"mask_loss must be one of {MASK_LOSSES}, got {mask_loss!r}")
        if num_coalitions < 1 or (paired and num_coalitions % 2):
            raise ValueError(f"num_coalitions must be positive (and even when paired), got {num_coalitions}")
        if lam < 0 or mu < 0:
            raise ValueError(f"lam and mu must be non-negative, got {lam} and {mu}")
        self.lam, self.mu = lam, mu
        self.num_coalitions, self.paired, self.stop_grad = num_coalitions, paired, stop_grad
        self.mask_loss, self.method = mask_loss, method

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
        """One loss evaluation: Φ, f and v_x(S) from a single packed pass of the engine.

        Args:
            model: a ShapleyViT, or one wrapped in DistributedDataParallel: it is called as
                ``model(images, coalitions, paired=...) -> (phi, logits, values)``.
            images: (B, C, H, W); targets: (B,) int64.
            coalitions: bool (B, M, N); sampled with ``generator`` when None.
        """
        if coalitions is None:
            players = getattr(model, "module", model).num_players  # unwrap DistributedDataParallel
            coalitions = self.sample(images.shape[0], players, generator, device=images.device)
        if coalitions.dim() == 2:
            coalitions = coalitions.unsqueeze(0).expand(images.shape[0], -1, -1)
        phi, logits, values = model(images, coalitions, paired=self.paired)  # through DDP's forward
        out = ShapleyOutput(phi=phi, logits=logits, values=values)
        cls = F.cross_entropy(out.logits, targets)
        sv = shapley_regression_loss(out.phi, out.values, coalitions, stop_grad=self.stop_grad)
        total = cls + self.lam * sv
        if self.mask_loss == "ce":
            mask = F.cross_entropy(out.values.flatten(0, 1), targets.repeat_interleave(coalitions.shape[1]))
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
