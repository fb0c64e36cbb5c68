"""The result type of every explainer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["Attribution"]


@dataclass
class Attribution:
    """Shapley values of the patches of B images for K_t target classes.

    Attributes:
        values: (B, N, K_t) φ, in the dtype of the model's output (at least float32).
        base: (B, K_t) v(∅).
        full: (B, K_t) v(N). Efficiency: values.sum(1) == full - base.
        evaluations: model evaluations (coalitions) used per image.
        std_error: (B, N, K_t) standard error of each φ (``kernel``, ``permutation``), else None.
        target: (B, K_t) int64 class of each column.
        method: the estimator's name.
        seconds: wall time of the estimate.
    """

    values: torch.Tensor
    base: torch.Tensor
    full: torch.Tensor
    evaluations: int
    target: torch.Tensor
    method: str
    std_error: torch.Tensor | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def efficiency_gap(self) -> torch.Tensor:
        """(B, K_t) Σ_i φ_i - (v(N) - v(∅)), in float64."""
        return self.values.double().sum(1) - (self.full.double() - self.base.double())

    def to(self, device) -> Attribution:
        def move(t):
            return None if t is None else t.to(device)

        return Attribution(
            values=move(self.values),
            base=move(self.base),
            full=move(self.full),
            evaluations=self.evaluations,
            target=move(self.target),
            method=self.method,
            std_error=move(self.std_error),
            seconds=self.seconds,
            extra=dict(self.extra),
        )
