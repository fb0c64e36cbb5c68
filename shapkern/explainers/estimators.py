"""Shapley value estimators on a game (docs/design.md, "The game").

Each estimator takes a :class:`~shapkern.explainers.game.ValueFunction` restricted to the target
classes, with v(∅) and v(N) already evaluated, and returns φ (B, N, K_t) in float64, standard
errors where it has them, and the evaluations it spent per image. Reductions over coalitions run
in the bit-packed ``coalition_reduce`` op.

- ``exact``: all 2^N coalitions, φ_i = Σ_S |S|!(N-|S|-1)!/N! (v(S∪i) - v(S)).
- ``permutation``: marginal contributions along random orderings, antithetic by default.
- ``kernel``: KernelSHAP, constrained weighted least squares on Shapley-kernel coalitions, paired
  by default, with sandwich standard errors and early stopping at ``tol``.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from shapkern.coalitions import (
    MAX_EXACT_PLAYERS,
    all_coalitions,
    permutation_chain,
    sample_coalitions,
    sample_permutations,
)
from shapkern.explainers.game import ValueFunction
from shapkern.ops import coalition_gram, coalition_reduce, pack_masks

__all__ = ["ACC_DTYPE", "check_exact", "endpoints", "exact", "kernel", "permutation"]

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
            f"method='exact' enumerates 2^N coalitions and is limited to N <= {MAX_EXACT_PLAYERS} players; "
            f"this model has N = {players}. Use method='kernel' or 'permutation' with a budget."
        )


def _check_budget(budget: int, minimum: int, method: str, what: str) -> None:
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
    _check_budget(budget, 2 + 2 * cost, "permutation", f"∅, N and 2 units of {cost} coalitions")
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


def _kernel_solve(a, b, delta):
    """Constrained least squares: min φᵀAφ - 2bᵀφ s.t. 1ᵀφ = delta.

    a (B, N, N), b (B, N, K), delta (B, K) -> φ (B, N, K) and the projection C (B, N, N) with
    dφ = C (db - dA φ): C = A⁺ - A⁺11ᵀA⁺ / 1ᵀA⁺1.
    """
    a_inv = torch.linalg.pinv(a, hermitian=True)
    ones = torch.ones(a.shape[-1], 1, dtype=a.dtype, device=a.device)
    a_inv_1 = a_inv @ ones  # (B, N, 1)
    denom = (ones.mT @ a_inv_1).squeeze(-1)  # (B, 1)
    a_inv_b = a_inv @ b
    phi = a_inv_b - a_inv_1 * ((a_inv_b.sum(1) - delta) / denom).unsqueeze(1)
    projection = a_inv - a_inv_1 @ a_inv_1.mT / denom.unsqueeze(-1)
    return phi, projection


def _kernel_se(masks, values, base, phi, projection, per_unit):
    """Sandwich standard errors of KernelSHAP, (B, N, K).

    Linearising the KKT system gives dφ = C (db - dA φ), so unit u has influence C z_u r_u with
    the residual r_u = v(z_u) - v(∅) - z_uᵀφ (paired units average their two coalitions).
    """
    z = masks.to(_ACC)
    resid = values - base.unsqueeze(1) - z @ phi  # (B, M, K)
    g = (z.unsqueeze(-1) * resid.unsqueeze(2)).unflatten(1, (-1, per_unit)).mean(2)  # (B, U, N, K)
    units = g.shape[1]
    if units < 2:
        return torch.full_like(phi, float("inf"))
    g = g - g.mean(1, keepdim=True)
    influence = torch.einsum("bij,bujk->buik", projection, g)
    return (influence.square().sum(1) / (units * (units - 1))).sqrt()


def kernel(game: ValueFunction, base, full, *, budget, paired, tol, batch_size, generator, progress):
    """KernelSHAP (docs/design.md, "The game"): A = E[z zᵀ], b = E[z (v(z) - v(∅))] over Shapley-kernel
    samples,
    φ = A⁻¹(b - 1 (1ᵀA⁻¹b - v(N) + v(∅)) / 1ᵀA⁻¹1). b comes from the bit-packed reduction.
    """
    n, batch = game.players, game.batch
    if n < 2:
        return (full - base).unsqueeze(1), None, 2
    per_unit = 2 if paired else 1
    _check_budget(budget, 2 + 2 * per_unit, "kernel", "∅, N and two sampled units")
    max_samples = (budget - 2) // per_unit * per_unit
    step = max(per_unit, batch_size // per_unit * per_unit)
    masks, values = [], []
    a = torch.zeros(batch, n, n, dtype=_ACC, device=game.device)
    b = None
    delta = full - base
    taken = 0
    bar = tqdm(total=max_samples, desc="kernel", unit="coalition", disable=not progress)
    while taken < max_samples:
        num = min(step, max_samples - taken)
        z = sample_coalitions(batch, num, n, method="shapley", paired=paired, generator=generator)
        z = z.to(game.device)
        v = _evaluate(game, z)
        packed = pack_masks(z)
        ones = torch.ones(batch, num, device=game.device)  # float32 counts are exact below 2^24 coalitions
        a += coalition_gram(packed, ones, n).to(_ACC)  # Σ z zᵀ by AND + popcount on the packed words
        part = coalition_reduce(packed, v - base.unsqueeze(1), ones.to(_ACC), num_players=n)[0]
        b = part if b is None else b + part
        masks.append(z)
        values.append(v)
        taken += num
        bar.update(num)
        if tol is not None and taken // per_unit >= max(n, 2):
            phi, proj = _kernel_solve(a / taken, b / taken, delta)
            se = _kernel_se(torch.cat(masks, 1), torch.cat(values, 1), base, phi, proj, per_unit)
            if se.max() < tol:
                bar.close()
                return phi, se, 2 + taken
    bar.close()
    phi, proj = _kernel_solve(a / taken, b / taken, delta)
    se = _kernel_se(torch.cat(masks, 1), torch.cat(values, 1), base, phi, proj, per_unit)
    return phi, se, 2 + taken
