"""``kernel`` and ``leverage``: KernelSHAP without waste (docs/design.md, "The game").

Distinct coalitions stratified by size, border sizes enumerated, paired by default
(:mod:`~shapkern.explainers.sampling`); the constrained regression with sandwich standard errors
(:mod:`~shapkern.explainers.regression`); early stop at ``tol``. ``leverage`` draws the sizes
uniformly (LeverageSHAP), which helps at large N.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from shapkern.explainers import regression
from shapkern.explainers.estimators.base import Estimate, Estimator, EstimatorName, evaluate_rows
from shapkern.explainers.sampling import Allocation, design_seed, expected_units, sample_design
from shapkern.games import Game

__all__ = ["KernelSHAP", "LeverageSHAP"]


def _rounds(design, tol, coalitions_per_call: int, allocation: Allocation):
    """Units per stratum (H,) int64 after each round: one round holding the whole design, or with
    ``tol`` rounds growing by a call or 25 % (whichever is more) from max(N, 2) units on. Round t
    takes of every stratum the units that a design of t units would expect (border strata first),
    at least one, never fewer than before: the first units of each stratum, so each round is
    itself a stratified design. Strata expecting under one unit in the whole design keep their
    0 or 1 unit from the start (their weight is the whole design's inclusion probability)."""
    drawn = design.drawn
    if tol is None:
        yield drawn
        return
    players = design.coalitions.shape[1]
    total = int(drawn.sum())
    step = max(1, coalitions_per_call // design.per_unit)
    taken = min(total, max(players, 2, step))
    counts = torch.zeros_like(drawn)
    while taken < total:
        budget = 2 + design.per_unit * taken
        expected = expected_units(players, budget, allocation=allocation, paired=design.per_unit == 2)[2]
        want = torch.where(design.expected >= 1, torch.ceil(expected).long().clamp_min(1), drawn)
        counts = torch.maximum(counts, torch.minimum(want, drawn))
        yield counts
        if torch.equal(counts, drawn):
            return
        taken = max(taken + step, math.ceil(1.25 * taken), int(counts.sum()) + 1)
    yield drawn


class KernelSHAP(Estimator):
    """KernelSHAP on a stratified design of distinct coalitions, drawn on the CPU from ``seed`` (the
    same coalitions on every device). Evaluates at most ``budget`` coalitions per image; 2^N once
    the budget covers every coalition."""

    name: ClassVar[EstimatorName] = "kernel"
    allocation: ClassVar[Allocation] = "shapley"  # how the draws spread over coalition sizes

    def min_budget(self, players: int) -> int:
        return 2 + 2 * (2 if self.paired else 1) if players >= 2 else 2

    def budget_parts(self, players: int) -> str:
        return "∅, N and two sampled units"

    def approximate(self, game: Game, budget: int, base: torch.Tensor, full: torch.Tensor) -> Estimate:
        n = game.players
        if n < 2:
            return Estimate((full - base).unsqueeze(1), None, 2)
        self.check_budget(budget, n)
        per_unit = 2 if self.paired else 1
        design = sample_design(
            n, budget, allocation=self.allocation, paired=self.paired, seed=design_seed(self.seed)
        )
        rows = design.coalitions.shape[0]
        done = torch.zeros(rows, dtype=torch.bool)
        values = base.new_zeros(game.batch, rows, base.shape[-1])  # y = v(S) - v(∅) of the rows done
        bar = tqdm(total=rows, desc=self.name, unit="coalition", disable=not self.progress)
        for counts in _rounds(design, self.tol, self.coalitions_per_call, self.allocation):
            sample = design.sample(counts)
            new = sample.rows[~done[sample.rows]]
            if new.numel():
                part = evaluate_rows(
                    game,
                    design.coalitions[new],
                    coalitions_per_call=self.coalitions_per_call,
                    per_unit=per_unit,
                    bar=bar,
                )
                values[:, new.to(values.device)] = part - base.unsqueeze(1)
                done[new] = True
            phi, se = regression.fit(sample, values[:, sample.rows.to(values.device)], full - base)
            if self.tol is not None and se.max() < self.tol:
                break
        bar.close()
        return Estimate(phi, se, 2 + int(done.sum()))


class LeverageSHAP(KernelSHAP):
    """:class:`KernelSHAP` with the coalition sizes drawn uniformly (LeverageSHAP)."""

    name = "leverage"
    allocation = "uniform"
