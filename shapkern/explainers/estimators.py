"""Shapley value estimators on a game (docs/design.md, "The game").

Each estimator takes a :class:`~shapkern.explainers.game.ValueFunction` restricted to the target
classes, with v(∅) and v(N) already evaluated, and returns φ (B, N, K) in float64, standard
errors where it has them, and the coalitions it evaluated per image, v(∅) and v(N) included.
Reductions over coalitions run in the bit-packed ops (``coalition_reduce``, ``coalition_gram``).

- ``exact``: all 2^N coalitions, φ_i = Σ_S |S|!(N-|S|-1)!/N! (v(S∪i) - v(S)).
- ``permutation``: marginal contributions along random orderings, antithetic by default.
- ``kernel``: KernelSHAP without waste: distinct coalitions stratified by size, border sizes
  enumerated, paired by default (:mod:`~shapkern.explainers.sampling`); the constrained
  regression with sandwich standard errors (:mod:`~shapkern.explainers.regression`); early stop at
  ``tol``. ``allocation="leverage"`` draws sizes uniformly (LeverageSHAP).

The Bayesian-quadrature estimator is in :mod:`~shapkern.explainers.bayes`.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from shapkern.coalitions import MAX_EXACT_PLAYERS, all_coalitions, permutation_chain, sample_permutations
from shapkern.explainers import regression
from shapkern.explainers.game import ValueFunction
from shapkern.explainers.sampling import expected_units, sample_design
from shapkern.ops import coalition_reduce, pack_masks

__all__ = [
    "ACC_DTYPE",
    "check_budget",
    "check_exact",
    "endpoints",
    "evaluate_rows",
    "exact",
    "kernel",
    "permutation",
]

ACC_DTYPE = torch.float64
_ACC = ACC_DTYPE


def _evaluate(game: ValueFunction, coalitions: torch.Tensor) -> torch.Tensor:
    """Values in float64 without autograd: bool (B, M, N) -> (B, M, K)."""
    with torch.no_grad():
        values = game(coalitions)
    if values.dim() != 3 or values.shape[:2] != coalitions.shape[:2]:
        raise ValueError(
            f"the value function returned shape {tuple(values.shape)} for coalitions "
            f"{tuple(coalitions.shape)}; expected (B, M, K)"
        )
    return values.to(_ACC)


def _reduce(masks: torch.Tensor, values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_m w_m z_{m,n} v_{m,k} through the bit-packed op: (B, M, N), (B, M, K), (B, M) -> (B, N, K)."""
    sums, _ = coalition_reduce(
        pack_masks(masks), values, weights.to(values.dtype), num_players=masks.shape[-1]
    )
    return sums


def endpoints(game: ValueFunction) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """v(∅) and v(N), (B, K) float64 each, from one call of two coalitions, and the output dtype
    of the attribution (the game's, at least float32)."""
    ends = torch.zeros(game.batch, 2, game.players, dtype=torch.bool, device=game.device)
    ends[:, 1] = True
    with torch.no_grad():
        values = game(ends)
    dtype = torch.promote_types(values.dtype, torch.float32)
    values = values.to(_ACC)
    return values[:, 0], values[:, 1], dtype


def check_exact(players: int) -> None:
    if players > MAX_EXACT_PLAYERS:
        raise ValueError(
            f"method='exact' enumerates 2^N coalitions and is limited to N <= {MAX_EXACT_PLAYERS} "
            f"players; this model has N = {players}. Use method='auto', 'bayes', 'leverage', 'kernel' or "
            "'permutation' with a budget."
        )


def check_budget(budget: int, minimum: int, method: str, what: str) -> None:
    if budget < minimum:
        raise ValueError(
            f"budget={budget} is too small for method={method!r}: it needs at least {minimum} ({what})"
        )


def exact(game: ValueFunction, base, full, *, batch_size, progress):
    """Full enumeration. Coefficient of v(S) in φ_i: w+(|S|) if i ∈ S, else -w-(|S|), with
    w+(s) = (s-1)!(N-s)!/N! and w-(s) = s!(N-s-1)!/N!. As one reduction:
    φ_i = Σ_S (w+ + w-)(|S|) z_i v(S) - Σ_S w-(|S|) v(S); ∅ and N contribute (v(N) - v(∅))/N.
    """
    n = game.players
    check_exact(n)
    s = torch.arange(n + 1, dtype=_ACC, device=game.device)
    log_fact = torch.lgamma(torch.arange(n + 2, dtype=_ACC, device=game.device) + 1)
    w_in = torch.exp(log_fact[(s - 1).clamp(min=0).long()] + log_fact[(n - s).long()] - log_fact[n])
    w_out = torch.exp(log_fact[s.long()] + log_fact[(n - s - 1).clamp(min=0).long()] - log_fact[n])
    phi = ((full - base) / n).unsqueeze(1).expand(-1, n, -1).clone()
    total = 1 << n
    if n == 1:
        return phi, total
    bar = tqdm(total=total - 2, desc="exact", unit="coalition", disable=not progress)
    start = 0
    for chunk in all_coalitions(n, chunk_size=batch_size, device=game.device):
        lo, hi = int(start == 0), chunk.shape[0] - int(start + chunk.shape[0] == total)
        start += chunk.shape[0]
        chunk = chunk[lo:hi].unsqueeze(0).expand(game.batch, -1, -1)
        if chunk.shape[1] == 0:
            continue
        values = _evaluate(game, chunk)
        size = chunk[0].sum(-1)
        weights = (w_in[size] + w_out[size]).expand(game.batch, -1)
        phi += _reduce(chunk, values, weights)
        phi -= torch.einsum("m,bmk->bk", w_out[size], values).unsqueeze(1)
        bar.update(chunk.shape[1])
    bar.close()
    return phi, total


def permutation(game: ValueFunction, base, full, *, budget, paired, tol, batch_size, generator, progress):
    """Mean marginal contribution along random orderings. Along one chain S_0 = ∅ ⊂ ... ⊂ S_N, the
    step d_j = v(S_j) - v(S_{j-1}) belongs to the player in S_j \\ S_{j-1}, so the contributions of
    all players are one reduction: masks S_j with weight +1 and masks S_{j-1} with weight -1,
    values d_j. Units (a permutation, or an antithetic pair) are i.i.d.; the standard error is
    their standard deviation / sqrt(units).
    """
    n, batch = game.players, game.batch
    per_unit = 2 if paired else 1
    cost = per_unit * max(n - 1, 0)  # ∅ and N are evaluated once, shared by all orderings
    if n < 2:
        return (full - base).unsqueeze(1), None, 2
    check_budget(budget, 2 + 2 * cost, "permutation", f"∅, N and 2 units of {cost} coalitions")
    max_units = (budget - 2) // cost
    step = max(1, batch_size // cost)
    unit_sums = []
    units = 0
    bar = tqdm(total=max_units, desc="permutation", unit="unit", disable=not progress)
    while units < max_units:
        num = min(step, max_units - units)
        perms = sample_permutations(batch, num * per_unit, n, antithetic=paired, generator=generator)
        chain = permutation_chain(perms.to(game.device))  # (B, P, N+1, N)
        interior = _evaluate(game, chain[:, :, 1:-1].flatten(1, 2)).unflatten(1, (num * per_unit, n - 1))
        ends = [
            base.unsqueeze(1).expand(-1, num * per_unit, -1),
            full.unsqueeze(1).expand(-1, num * per_unit, -1),
        ]
        values = torch.cat([ends[0].unsqueeze(2), interior, ends[1].unsqueeze(2)], dim=2)  # (B, P, N+1, K)
        steps = values[:, :, 1:] - values[:, :, :-1]  # (B, P, N, K)
        # One reduction per unit: rows (B * units, per_unit * 2N).
        masks = torch.cat([chain[:, :, 1:], chain[:, :, :-1]], dim=2).reshape(batch * num, -1, n)
        vals = torch.cat([steps, steps], dim=2).reshape(batch * num, -1, steps.shape[-1])
        sign = torch.cat([torch.ones(n), -torch.ones(n)]).to(device=game.device, dtype=_ACC)
        weights = sign.repeat(per_unit).expand(batch * num, -1) / per_unit
        unit_sums.append(_reduce(masks, vals, weights).view(batch, num, n, -1))
        units += num
        bar.update(num)
        if tol is not None and units >= 2 and _mean_se(torch.cat(unit_sums, 1))[1].max() < tol:
            break
    bar.close()
    phi, se = _mean_se(torch.cat(unit_sums, 1))
    return phi, se, 2 + units * cost


def _mean_se(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error over dim 1 of i.i.d. samples (B, U, N, K)."""
    units = samples.shape[1]
    mean = samples.mean(1)
    if units < 2:
        return mean, torch.full_like(mean, float("inf"))
    return mean, samples.std(1) / math.sqrt(units)


def evaluate_rows(
    game: ValueFunction, rows: torch.Tensor, *, batch_size: int, per_unit: int, bar
) -> torch.Tensor:
    """v(S) of coalitions shared by all images: bool (M, N) -> (B, M, K) float64, in calls of at
    most ``batch_size`` rows per image that keep units of ``per_unit`` rows whole."""
    step = max(per_unit, batch_size // per_unit * per_unit)
    out = []
    for z in rows.split(step):
        out.append(_evaluate(game, z.to(game.device).unsqueeze(0).expand(game.batch, -1, -1)))
        bar.update(z.shape[0])
    return torch.cat(out, 1)


def _rounds(design, tol, batch_size: int, allocation: str):
    """Units per stratum (H,) int64 after each round: one round holding the whole design, or with
    ``tol`` rounds growing by a batch or 25 % (whichever is more) from max(N, 2) units on. Round t
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
    step = max(1, batch_size // design.per_unit)
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


def kernel(game: ValueFunction, base, full, *, budget, paired, tol, allocation, batch_size, seed, progress):
    """KernelSHAP on a stratified design of distinct coalitions (docs/design.md, "The game").

    ``allocation`` spreads the draws over sizes (``"kernel"`` or ``"leverage"``); ``seed`` (int)
    draws the design on the CPU. Returns φ (B, N, K), its sandwich standard errors and the
    evaluations per image (at most ``budget``; 2^N once the budget covers every coalition).
    """
    n = game.players
    if n < 2:
        return (full - base).unsqueeze(1), None, 2
    per_unit = 2 if paired else 1
    check_budget(budget, 2 + 2 * per_unit, allocation, "∅, N and two sampled units")
    design = sample_design(n, budget, allocation=allocation, paired=paired, seed=seed)
    rows = design.coalitions.shape[0]
    done = torch.zeros(rows, dtype=torch.bool)
    values = None
    bar = tqdm(total=rows, desc=allocation, unit="coalition", disable=not progress)
    for counts in _rounds(design, tol, batch_size, allocation):
        sample = design.sample(counts)
        new = sample.rows[~done[sample.rows]]
        if new.numel():
            part = evaluate_rows(
                game, design.coalitions[new], batch_size=batch_size, per_unit=per_unit, bar=bar
            )
            if values is None:
                values = part.new_zeros(game.batch, rows, part.shape[-1])
            values[:, new.to(values.device)] = part - base.unsqueeze(1)
            done[new] = True
        phi, se = regression.fit(sample, values[:, sample.rows.to(values.device)], full - base)
        if tol is not None and se.max() < tol:
            break
    bar.close()
    return phi, se, 2 + int(done.sum())
