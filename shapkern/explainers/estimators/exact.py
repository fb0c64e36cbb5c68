"""``exact``: all 2^N coalitions, φ_i = Σ_S |S|!(N-|S|-1)!/N! (v(S∪i) - v(S))."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from shapkern.coalitions import MAX_EXACT_PLAYERS, all_coalitions
from shapkern.explainers.estimators.base import ACC_DTYPE, Estimate, Estimator, evaluate, reduce_onto_players
from shapkern.games import Game

__all__ = ["Exact", "check_exact"]


def check_exact(players: int) -> None:
    """A ValueError for more than MAX_EXACT_PLAYERS players."""
    if players > MAX_EXACT_PLAYERS:
        raise ValueError(
            f"method='exact' enumerates 2^N coalitions and is limited to N <= {MAX_EXACT_PLAYERS} "
            f"players; this model has N = {players}. Use method='auto', 'bayes', 'leverage', 'kernel' or "
            "'permutation' with a budget."
        )


class Exact(Estimator):
    """Full enumeration. Coefficient of v(S) in φ_i: w+(|S|) if i ∈ S, else -w-(|S|), with
    w+(s) = (s-1)!(N-s)!/N! and w-(s) = s!(N-s-1)!/N!. As one reduction:
    φ_i = Σ_S (w+ + w-)(|S|) z_i v(S) - Σ_S w-(|S|) v(S); ∅ and N contribute (v(N) - v(∅))/N.
    ``paired``, ``tol`` and ``seed`` do not apply."""

    name = "exact"

    def min_budget(self, players: int) -> int:
        check_exact(players)
        return 1 << players

    def budget_parts(self, players: int) -> str:
        return f"all 2^{players} coalitions; 'bayes', 'leverage' or 'kernel' take fewer"

    def approximate(self, game: Game, budget: int, base: torch.Tensor, full: torch.Tensor) -> Estimate:
        n = game.players
        check_exact(n)
        s = torch.arange(n + 1, dtype=ACC_DTYPE, device=game.device)
        log_fact = torch.lgamma(torch.arange(n + 2, dtype=ACC_DTYPE, device=game.device) + 1)
        w_in = torch.exp(log_fact[(s - 1).clamp(min=0).long()] + log_fact[(n - s).long()] - log_fact[n])
        w_out = torch.exp(log_fact[s.long()] + log_fact[(n - s - 1).clamp(min=0).long()] - log_fact[n])
        phi = ((full - base) / n).unsqueeze(1).expand(-1, n, -1).clone()
        total = 1 << n
        if n == 1:
            return Estimate(phi, None, total)
        bar = tqdm(total=total - 2, desc="exact", unit="coalition", disable=not self.progress)
        start = 0
        for chunk in all_coalitions(n, coalitions_per_chunk=self.coalitions_per_call, device=game.device):
            lo, hi = int(start == 0), chunk.shape[0] - int(start + chunk.shape[0] == total)
            start += chunk.shape[0]
            chunk = chunk[lo:hi].unsqueeze(0).expand(game.batch, -1, -1)
            if chunk.shape[1] == 0:
                continue
            values = evaluate(game, chunk)
            size = chunk[0].sum(-1)
            weights = (w_in[size] + w_out[size]).expand(game.batch, -1)
            phi += reduce_onto_players(chunk, values, weights)
            phi -= torch.einsum("m,bmk->bk", w_out[size], values).unsqueeze(1)
            bar.update(chunk.shape[1])
        bar.close()
        return Estimate(phi, None, total)
