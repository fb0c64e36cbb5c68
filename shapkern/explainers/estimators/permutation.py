"""``permutation``: marginal contributions along random orderings, antithetic by default."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from shapkern.coalitions import permutation_chain, sample_permutations
from shapkern.explainers.estimators.base import ACC_DTYPE, Estimate, Estimator, evaluate, reduce_onto_players
from shapkern.games import Game

__all__ = ["Permutation"]


def _mean_se(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error over dim 1 of i.i.d. samples (B, U, N, K)."""
    units = samples.shape[1]
    mean = samples.mean(1)
    if units < 2:
        return mean, torch.full_like(mean, float("inf"))
    return mean, samples.std(1) / math.sqrt(units)


class Permutation(Estimator):
    """Mean marginal contribution along random orderings. Along one chain S_0 = ∅ ⊂ ... ⊂ S_N, the
    step d_j = v(S_j) - v(S_{j-1}) belongs to the player in S_j \\ S_{j-1}, so the contributions of
    all players are one reduction: masks S_j with weight +1 and masks S_{j-1} with weight -1,
    values d_j. Units (a permutation, or an antithetic pair with ``paired``) are i.i.d.; the
    standard error is their standard deviation / sqrt(units)."""

    name = "permutation"

    def _cost(self, players: int) -> int:
        # ∅ and N are evaluated once, shared by all orderings
        return (2 if self.paired else 1) * max(players - 1, 0)

    def min_budget(self, players: int) -> int:
        return 2 + 2 * self._cost(players) if players >= 2 else 2

    def budget_parts(self, players: int) -> str:
        return f"∅, N and 2 units of {self._cost(players)} coalitions"

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = torch.Generator(device=device)
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen

    def approximate(self, game: Game, budget: int, base: torch.Tensor, full: torch.Tensor) -> Estimate:
        n, batch = game.players, game.batch
        if n < 2:
            return Estimate((full - base).unsqueeze(1), None, 2)
        self.check_budget(budget, n)
        per_unit, cost = (2 if self.paired else 1), self._cost(n)
        max_units = (budget - 2) // cost
        step = max(1, self.coalitions_per_call // cost)
        generator = self._generator(game.device)
        sign = torch.cat([torch.ones(n), -torch.ones(n)]).to(device=game.device, dtype=ACC_DTYPE)
        unit_sums, units = [], 0
        bar = tqdm(total=max_units, desc="permutation", unit="unit", disable=not self.progress)
        while units < max_units:
            num = min(step, max_units - units)
            perms = sample_permutations(batch, num * per_unit, n, paired=self.paired, generator=generator)
            chain = permutation_chain(perms.to(game.device))  # (B, P, N+1, N)
            interior = evaluate(game, chain[:, :, 1:-1].flatten(1, 2)).unflatten(1, (num * per_unit, n - 1))
            ends = [x.unsqueeze(1).expand(-1, num * per_unit, -1).unsqueeze(2) for x in (base, full)]
            values = torch.cat([ends[0], interior, ends[1]], dim=2)  # (B, P, N+1, K)
            steps = values[:, :, 1:] - values[:, :, :-1]  # (B, P, N, K)
            # One reduction per unit: rows (B * units, per_unit * 2N).
            masks = torch.cat([chain[:, :, 1:], chain[:, :, :-1]], dim=2).reshape(batch * num, -1, n)
            vals = torch.cat([steps, steps], dim=2).reshape(batch * num, -1, steps.shape[-1])
            weights = sign.repeat(per_unit).expand(batch * num, -1) / per_unit
            unit_sums.append(reduce_onto_players(masks, vals, weights).view(batch, num, n, -1))
            units += num
            bar.update(num)
            if self.tol is not None and units >= 2 and _mean_se(torch.cat(unit_sums, 1))[1].max() < self.tol:
                break
        bar.close()
        phi, se = _mean_se(torch.cat(unit_sums, 1))
        return Estimate(phi, se, 2 + units * cost)
