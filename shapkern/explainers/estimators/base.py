"""The interface every Shapley estimator implements, its result, and the pieces they share.

An :class:`Estimator` is built with its options (``paired``, ``tol``, ``seed``, ``coalitions_per_call``,
``progress``) and run on a game restricted to the target outputs, with v(∅) and v(N) already
evaluated: ``estimator.approximate(game, budget, base, full)`` returns an :class:`Estimate`, φ
(B, N, K) in float64, standard errors where the method has them, and the coalitions it evaluated
per image, v(∅) and v(N) included. Reductions over coalitions run in the bit-packed ops
(``coalition_reduce``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal, NamedTuple

import torch

from shapkern.games import Game
from shapkern.ops import coalition_reduce, pack_coalitions

__all__ = [
    "ACC_DTYPE",
    "DEFAULT_COALITIONS_PER_CALL",
    "Estimate",
    "Estimator",
    "EstimatorName",
    "endpoints",
    "evaluate",
    "evaluate_rows",
    "reduce_onto_players",
]

ACC_DTYPE = torch.float64
DEFAULT_COALITIONS_PER_CALL = 1024
# The estimators' names (the ``method`` of estimate and explain): KernelSHAP is "kernel",
# LeverageSHAP "leverage".
EstimatorName = Literal["exact", "permutation", "kernel", "leverage", "bayes"]


class Estimate(NamedTuple):
    """What an estimator returns: values (B, N, K) float64, std_error (B, N, K) or None, and the
    coalitions evaluated per image (v(∅) and v(N) included)."""

    values: torch.Tensor
    std_error: torch.Tensor | None
    evaluations: int


class Estimator(ABC):
    """A Shapley value estimator (shapiq's ``Approximator`` is the model).

    Args:
        paired: complementary coalitions / antithetic permutations.
        tol: stop once the largest standard error falls under tol (methods that support it).
        seed: seeds the method's randomness (None: a fresh draw).
        coalitions_per_call: coalitions per image per call of the game.
        progress: a progress bar.
    """

    name: ClassVar[EstimatorName]

    def __init__(
        self,
        *,
        paired: bool = True,
        tol: float | None = None,
        seed: int | None = None,
        coalitions_per_call: int = DEFAULT_COALITIONS_PER_CALL,
        progress: bool = True,
    ):
        if (
            isinstance(coalitions_per_call, bool)
            or not isinstance(coalitions_per_call, int)
            or coalitions_per_call < 1
        ):
            raise ValueError(f"coalitions_per_call must be a positive int, got {coalitions_per_call!r}")
        if tol is not None and not tol > 0:
            raise ValueError(f"tol must be positive, got {tol}")
        self.paired, self.tol, self.seed = paired, tol, seed
        self.coalitions_per_call, self.progress = coalitions_per_call, progress

    def min_budget(self, players: int) -> int:
        """The fewest evaluations per image this method runs with on N players."""
        return 2

    def check_budget(self, budget: int, players: int) -> None:
        """A ValueError naming the method and its minimum for a budget below it."""
        minimum = self.min_budget(players)
        if budget < minimum:
            raise ValueError(
                f"budget={budget} is too small for method={self.name!r}: it needs at least {minimum} "
                f"({self.budget_parts(players)})"
            )

    def budget_parts(self, players: int) -> str:
        """What the minimum budget consists of, for the message above."""
        return "∅ and N"

    @abstractmethod
    def approximate(self, game: Game, budget: int, base: torch.Tensor, full: torch.Tensor) -> Estimate:
        """φ of ``game`` (restricted to the target outputs) with at most ``budget`` evaluations per
        image; base, full: v(∅), v(N) (B, K) float64."""


def evaluate(game: Game, coalitions: torch.Tensor) -> torch.Tensor:
    """Values in float64 without autograd: bool (B, M, N) -> (B, M, K)."""
    with torch.no_grad():
        values = game(coalitions)
    if values.dim() != 3 or values.shape[:2] != coalitions.shape[:2]:
        raise ValueError(
            f"the value function returned shape {tuple(values.shape)} for coalitions "
            f"{tuple(coalitions.shape)}; expected (B, M, K)"
        )
    return values.to(ACC_DTYPE)


def reduce_onto_players(
    coalitions: torch.Tensor, values: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Σ_m w_m z_{m,n} v_{m,k} through the bit-packed op: (B, M, N), (B, M, K), (B, M) -> (B, N, K)."""
    sums, _ = coalition_reduce(
        pack_coalitions(coalitions), values, weights.to(values.dtype), num_players=coalitions.shape[-1]
    )
    return sums


def endpoints(game: Game) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """v(∅) and v(N), (B, K) float64 each, from one call of two coalitions, and the output dtype
    of the attribution (the game's, at least float32)."""
    ends = torch.zeros(game.batch, 2, game.players, dtype=torch.bool, device=game.device)
    ends[:, 1] = True
    with torch.no_grad():
        values = game(ends)
    dtype = torch.promote_types(values.dtype, torch.float32)
    values = values.to(ACC_DTYPE)
    return values[:, 0], values[:, 1], dtype


def evaluate_rows(
    game: Game, rows: torch.Tensor, *, coalitions_per_call: int, per_unit: int, bar
) -> torch.Tensor:
    """v(S) of coalitions shared by all images: bool (M, N) -> (B, M, K) float64, in calls of at
    most ``coalitions_per_call`` rows per image that keep units of ``per_unit`` rows whole."""
    step = max(per_unit, coalitions_per_call // per_unit * per_unit)
    out = []
    for z in rows.split(step):
        out.append(evaluate(game, z.to(game.device).unsqueeze(0).expand(game.batch, -1, -1)))
        bar.update(z.shape[0])
    return torch.cat(out, 1)
