"""``bayes``: Bayesian-quadrature Shapley values (the most accurate per evaluation here).

Shapley values depend only on a game's odd part o(S) = (v(S) - v(N∖S)) / 2, which a complementary
pair observes exactly. With x = 2z - 1 ∈ {±1}^N that part is Σ_T c_T χ_T(x), χ_T = Π_{i in T} x_i
over odd |T|, and χ_T is worth 2/|T| to every player of T. The prior: a flat additive part
(|T| = 1) plus independent c_T of variance ρ^t / C(N, t) for odd t = |T| >= 3 (energy per order
decaying like ρ^t). Its covariance depends on Hamming distance only, and the Shapley values of the
posterior mean are closed-form, so φ̂ costs O(m N) after an m x m Cholesky (m pairs). ρ is picked
per image and output by restricted likelihood; the posterior standard deviation is the standard
error; efficiency holds exactly (the pair (∅, N) is an exact observation).

The pairs are chosen greedily to minimise the posterior variance of the Shapley values
(:func:`greedy_pairs`, on the CPU, cached per (N, pairs, seed)). Past ``max_pairs`` pairs the
rest of the budget is a random leverage design around the greedy pairs, and φ̂ = φ(ĝ) +
KernelSHAP(v - ĝ): the Gaussian process becomes a control variate and the estimate stays
consistent at any budget, with design-based standard errors.
"""

from __future__ import annotations

import functools
import math

import torch
from tqdm.auto import tqdm

from shapkern.explainers import regression
from shapkern.explainers.estimators.base import Estimate, Estimator, evaluate_rows
from shapkern.explainers.estimators.kernel import KernelSHAP
from shapkern.explainers.sampling import all_subsets, design_seed, pair_representatives, sample_design
from shapkern.games import Game

__all__ = ["MAX_PAIRS", "Bayes", "greedy_pairs", "odd_walsh_covariance"]

_ACC = torch.float64
RHO_GRID = (0.2, 0.35, 0.6)  # decay per order; the ViT games measured 0.23-0.35, smooth MLPs ~0.4
DESIGN_RHO = 0.3
MAX_PAIRS = 2048
# Greedy design: candidates per step, and the cap on its O(steps · candidates · (steps + 6N)) work.
POOL = 8
WORK = 1e10
# Elements of the largest intermediate of the control variate's predictions (float64: 32 MiB).
_CHUNK_ELEMENTS = 1 << 22


@functools.lru_cache(maxsize=32)
def _odd_walsh_covariance_cpu(players: int, rho: float):
    n = players

    def normalised(total: int) -> torch.Tensor:
        # Row d: the coefficients of (1+u)^(total-d) (1-u)^d over C(total, t), one factor at a time
        # with a'_t = ((k+1-t) a_t ± t a_{t-1}) / (k+1), which keeps every entry within [-1, 1].
        coef = torch.zeros(total + 1, total + 1, dtype=_ACC)
        coef[:, 0] = 1
        sign = torch.where(torch.arange(total + 1).unsqueeze(1) > torch.arange(total), -1.0, 1.0).to(_ACC)
        t = torch.arange(total + 1, dtype=_ACC)
        for k in range(total):
            shifted = torch.cat([torch.zeros(total + 1, 1, dtype=_ACC), coef[:, :-1]], 1)
            coef = ((k + 1 - t).clamp_min(0) * coef + sign[:, k : k + 1] * t * shifted) / (k + 1)
        return coef

    orders = torch.arange(3, n + 1, 2)
    power = torch.tensor([rho**t for t in orders.tolist()], dtype=_ACC)
    k = normalised(n)[:, orders] @ power
    sv = (2 / n) * (normalised(n - 1)[:, orders - 1] @ power)
    return k, sv, float((4 / (orders.to(_ACC) * n) * power).sum())


def odd_walsh_covariance(players: int, rho: float, device=None):
    """The prior of the non-additive odd part and of its Shapley values.

    k(d) = Σ_{odd t >= 3} ρ^t K_t(d) / C(N, t), with K_t the Krawtchouk polynomial (the coefficient of
    u^t in (1+u)^{N-d} (1-u)^d), is the covariance of two points at Hamming distance d.

    Returns:
        k (N+1,) by distance; sv (N,): Cov(φ_i(h), h(x)) = x_i sv[p], p the number of players other
        than i present in x; and the prior variance of each φ_i(h). float64.
    """
    k, sv, var_phi = _odd_walsh_covariance_cpu(players, float(rho))
    return k.to(device), sv.to(device), var_phi


@functools.lru_cache(maxsize=8)
def greedy_pairs(players: int, units: int, *, seed: int = 0, rho: float = DESIGN_RHO) -> torch.Tensor:
    """``units`` distinct pair representatives chosen for :func:`bayes`, bool (units, N).

    A random pool of candidates uniform over sizes 1..N/2 (max(POOL x steps, 5/4 x units) of them)
    is drawn from ``seed``; every singleton pair is taken first when units >= N; then each step
    takes the candidate that most reduces the posterior variance of the Shapley values (summed
    over players) under the prior at ``rho``, its additive part 1e3 x the rest (effectively flat),
    by pivoted-Cholesky updates; past the steps that keep the work under WORK, the remaining units
    are untaken candidates in random order. Runs on the CPU (the same design on every device) and
    is cached: the returned tensor is shared, do not modify it.
    """
    n = players
    gen = torch.Generator().manual_seed(seed)
    forced = all_subsets(n, 1) if units >= n else torch.zeros(0, n, dtype=torch.bool)
    steps = units
    while steps > 64 and steps * max(POOL * steps, units + units // 4) * (steps + 6 * n) > WORK:
        steps = steps * 3 // 4
    steps = max(steps, forced.shape[0])
    per_size = max(16, -(-max(POOL * steps, units + units // 4) // (n // 2)))
    pool = [forced]
    for size in range(1 if units < n else 2, n // 2 + 1):
        population = math.comb(n, size) // (2 if 2 * size == n else 1)
        pool.append(pair_representatives(n, size, min(per_size, population), gen))
    cands = torch.cat(pool)
    if units >= cands.shape[0]:
        return cands
    x = 2 * cands.to(_ACC) - 1
    k, sv, _ = odd_walsh_covariance(n, rho)
    linear = 1e3 * float(k[0]) / n
    # Residual covariances given the points taken so far: with φ (N, P) and variances (P,).
    cov_phi = (x * sv[cands.sum(-1, keepdim=True) - cands.long()] + 2 * linear * x).T.contiguous()
    var = torch.full((cands.shape[0],), float(k[0]) + linear * n, dtype=_ACC)
    factor = torch.zeros(steps, cands.shape[0], dtype=_ACC)  # row s: the s-th pivot's column
    taken = torch.zeros(cands.shape[0], dtype=torch.bool)
    chosen = []
    floor = 1e-12 * float(k[0])
    for step in range(steps):
        if step < forced.shape[0]:
            j = step
        else:
            gain = cov_phi.square().sum(0) / var.clamp_min(floor)
            j = int(gain.masked_fill(taken, -1).argmax())
        col = k[((n - x @ x[j]) / 2).round().long()] + linear * (x @ x[j])
        col -= factor[:step].T @ factor[:step, j]
        pivot = col[j].clamp_min(floor).sqrt()
        factor[step] = col / pivot
        cov_phi -= torch.outer(cov_phi[:, j] / pivot, factor[step])
        var -= factor[step].square()
        taken[j] = True
        chosen.append(j)
    rest = (~taken).nonzero().view(-1)
    fill = rest[torch.randperm(rest.shape[0], generator=gen)[: units - steps]]
    return cands[torch.cat([torch.tensor(chosen, dtype=torch.long), fill])]


def _gp_fit(x: torch.Tensor, odd: torch.Tensor, *, std_error: bool):
    """Universal kriging of the odd part with a flat additive term; ρ by restricted likelihood.

    Args:
        x: (m, N) ±1 float64, the pairs' representatives; the last row the full coalition (exact).
        odd: (B, m, K) the odd values, (v(N) - v(∅)) / 2 last.

    Returns:
        φ (B, N, K), its posterior standard deviation at the fitted scale (B, N, K) or None, and the
        fit (``x``, additive part ``a`` (N, B K), weights ``alpha`` (m, B K), ``rho`` (B K,)) for
        :func:`_gp_predict`.
    """
    m, n = x.shape
    batch, _, outputs = odd.shape
    rhs = odd.permute(1, 0, 2).reshape(m, -1)  # (m, B K)
    dist = ((n - x @ x.T) / 2).round().long()
    others = (x > 0).sum(-1, keepdim=True) - (x > 0).long()  # players besides i present, (m, N)
    eye = torch.eye(m, dtype=_ACC, device=x.device)
    best: dict[str, torch.Tensor] = {}
    best_score = torch.empty(0)
    for rho in RHO_GRID:
        k, sv, var_phi = odd_walsh_covariance(n, rho, x.device)
        cov_phi = x * sv[others]  # (m, N): Cov(φ_i(h), h(x_j))
        chol = torch.linalg.cholesky(k[dist] + 1e-10 * float(k[0]) * eye)
        ki_x = torch.cholesky_solve(x, chol)
        gram = x.T @ ki_x
        ki_o = torch.cholesky_solve(rhs, chol)
        a = torch.linalg.solve(gram, x.T @ ki_o)  # (N, B K)
        alpha = ki_o - ki_x @ a
        quad = ((rhs - x @ a) * alpha).sum(0).clamp_min(1e-300)
        score = -0.5 * (
            (m - n) * torch.log(quad / (m - n)) + 2 * chol.diagonal().log().sum() + torch.logdet(gram)
        )
        fit = {"phi": 2 * a + cov_phi.T @ alpha, "a": a, "alpha": alpha, "rho": torch.full_like(score, rho)}
        if std_error:
            ki_u = torch.cholesky_solve(cov_phi, chol)
            resid = 2 * torch.eye(n, dtype=_ACC, device=x.device) - x.T @ ki_u
            unit = var_phi - (cov_phi * ki_u).sum(0) + (resid * torch.linalg.solve(gram, resid)).sum(0)
            fit["se"] = (unit.clamp_min(0).unsqueeze(1) * quad / (m - n)).sqrt()
        if not best:
            best, best_score = fit, score
            continue
        better = score > best_score
        best_score = torch.where(better, score, best_score)
        best = {key: torch.where(better, value, best[key]) for key, value in fit.items()}

    def per_image(t):  # (N, B K) -> (B, N, K)
        return t.reshape(n, batch, outputs).permute(1, 0, 2)

    phi = per_image(best["phi"])
    phi = phi + (2 * odd[:, -1:] - phi.sum(1, keepdim=True)) / n  # efficiency exact despite the jitter
    se = per_image(best["se"]) if std_error else None
    return phi, se, {"x": x, "a": best["a"], "alpha": best["alpha"], "rho": best["rho"]}


def _gp_predict(model: dict, x_new: torch.Tensor) -> torch.Tensor:
    """The posterior mean of the odd part at points x_new (M, N) ±1 float64: (M, B K)."""
    players = x_new.shape[1]
    out = x_new @ model["a"]
    dist = ((players - x_new @ model["x"].T) / 2).round().long()
    for rho in model["rho"].unique().tolist():
        k, _, _ = odd_walsh_covariance(players, rho, x_new.device)
        out += (k[dist] @ model["alpha"]) * (model["rho"] == rho).to(_ACC)
    return out


class Bayes(Estimator):
    """Bayesian-quadrature Shapley values (paired; budget >= 2N + 2; no ``tol``).

    Up to ``max_pairs`` greedy pairs go into the Gaussian process; a larger budget adds a random
    leverage design and KernelSHAP of the residual game (see the module docstring). Memory
    O(max_pairs²), time O(max_pairs³) for the fit. A budget covering every pair gives the exact
    regression. ``seed`` picks the greedy search's candidate pool and the random design; None
    takes the pool of seed 0 (the pairs need no randomness, and the cached design is reused: it
    costs seconds on a CPU from N = 16 and 2,048 evaluations on) and a fresh random design.
    """

    name = "bayes"

    def __init__(self, *, max_pairs: int = MAX_PAIRS, **options):
        super().__init__(**options)
        if self.tol is not None or not self.paired:
            raise ValueError(
                "method='bayes' is paired and spends its whole budget (its standard errors are "
                f"model-based); got tol={self.tol}, paired={self.paired}. Use 'kernel' or 'leverage' for "
                "tol or unpaired designs."
            )
        self.max_pairs = max_pairs

    def min_budget(self, players: int) -> int:
        return 2 * players + 2 if players >= 2 else 2

    def budget_parts(self, players: int) -> str:
        return "∅, N and N complementary pairs"

    def approximate(self, game: Game, budget: int, base: torch.Tensor, full: torch.Tensor) -> Estimate:
        n, seed = game.players, self.seed
        if n < 2:
            return Estimate((full - base).unsqueeze(1), None, 2)
        self.check_budget(budget, n)
        units = (budget - 2) // 2
        if units >= (1 << (n - 1)) - 1:  # every pair: the regression is exact, no prior needed
            exact = KernelSHAP(
                seed=seed, coalitions_per_call=self.coalitions_per_call, progress=self.progress
            )
            return exact.approximate(game, budget, base, full)
        reps = greedy_pairs(n, min(units, self.max_pairs), seed=0 if seed is None else seed)
        pairs = reps.shape[0]
        design = None
        if units > pairs:  # the greedy pairs enter a random design with certainty, the rest around them
            rest = design_seed(None if seed is None else seed + 1)
            design = sample_design(n, budget, allocation="uniform", seed=rest, certain=reps)
            rows = design.coalitions
        else:
            rows = torch.stack([reps, ~reps], 1).flatten(0, 1)
        bar = tqdm(total=rows.shape[0], desc="bayes", unit="coalition", disable=not self.progress)
        v = evaluate_rows(game, rows, coalitions_per_call=self.coalitions_per_call, per_unit=2, bar=bar)
        bar.close()
        odd = (v[:, 0::2] - v[:, 1::2]) / 2
        ends = ((full - base) / 2).unsqueeze(1)
        x = 2 * torch.cat([reps, torch.ones(1, n, dtype=torch.bool)]).to(device=v.device, dtype=_ACC) - 1
        phi, se, model = _gp_fit(x, torch.cat([odd[:, :pairs], ends], 1), std_error=True)
        if design is None:
            return Estimate(phi, se, rows.shape[0] + 2)
        # KernelSHAP of the residual game r = v - ĝ: odd, r(N∖S) = -r(S), ~0 on the greedy pairs.
        z = rows[0::2].to(v.device)
        step = max(1, _CHUNK_ELEMENTS // (2 * self.max_pairs))
        fitted = torch.cat([_gp_predict(model, 2 * part.to(_ACC) - 1) for part in z.split(step)])
        resid = odd - fitted.reshape(z.shape[0], game.batch, -1).permute(1, 0, 2)
        resid = torch.stack([resid, -resid], 2).flatten(1, 2)
        correction, se = regression.fit(design.sample(), resid, torch.zeros_like(base))
        return Estimate(phi + correction, se, design.evaluations)
