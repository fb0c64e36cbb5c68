import math

import torch

from shapkern.explainers.regression import constrained_solve, fit, shapley_kernel_weight
from shapkern.explainers.sampling import sample_design


def test_kernel_weight_is_the_normalised_shapley_kernel():
    """Per coalition (N-1)/(C(N, s) s (N-s)); over all coalitions of a size that is ∝ 1/(s(N-s)), total 1."""
    players = 7
    sizes = torch.arange(1, players)
    counts = torch.tensor([math.comb(players, s) for s in range(1, players)], dtype=torch.float64)
    mass = shapley_kernel_weight(players, sizes) * counts
    inverse = 1 / (sizes * (players - sizes)).double()
    torch.testing.assert_close(mass, inverse / inverse.sum())


def test_constrained_solve_matches_the_kkt_system():
    gen = torch.Generator().manual_seed(0)
    n, batch, outputs = 6, 2, 3
    m = torch.randn(20, n, generator=gen, dtype=torch.float64)
    a = m.T @ m
    b = torch.randn(batch, n, outputs, generator=gen, dtype=torch.float64)
    delta = torch.randn(batch, outputs, generator=gen, dtype=torch.float64)
    phi, projection = constrained_solve(a, b, delta)
    kkt = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    kkt[:n, :n], kkt[:n, n], kkt[n, :n] = a, 1, 1
    rhs = torch.cat([b, delta.unsqueeze(1)], 1)  # (B, N+1, K)
    want = torch.linalg.solve(kkt, rhs)[:, :n]
    torch.testing.assert_close(phi, want)
    # dφ = C db keeps the constraint: C 1 = 0 and Cᵀ = C.
    torch.testing.assert_close(
        projection @ torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    )
    torch.testing.assert_close(projection, projection.T)


def test_fit_uses_the_packed_sums_and_recovers_an_additive_game():
    players, batch = 9, 3
    design = sample_design(players, 120, seed=0)
    sample = design.sample()
    gen = torch.Generator().manual_seed(1)
    weights = torch.randn(batch, players, 2, generator=gen, dtype=torch.float64)
    z = sample.coalitions.double()
    y = torch.einsum("mn,bnk->bmk", z, weights)
    phi, se = fit(sample, y, weights.sum(1))
    torch.testing.assert_close(phi, weights, rtol=0, atol=1e-10)  # no residual: exact, zero error
    assert se.abs().max() < 1e-10
    # A non-additive game: the same φ as the dense normal equations.
    y = y + torch.randn(batch, z.shape[0], 2, generator=gen, dtype=torch.float64)
    w = shapley_kernel_weight(players, sample.coalitions.sum(-1)) * sample.expansion
    a = torch.einsum("mi,m,mj->ij", z, w, z)
    b = torch.einsum("mi,m,bmk->bik", z, w, y)
    delta = torch.randn(batch, 2, generator=gen, dtype=torch.float64)
    phi, se = fit(sample, y, delta)
    torch.testing.assert_close(phi, constrained_solve(a, b, delta)[0])
    assert (se > 0).all()
    assert fit(sample, y, delta, std_error=False)[1] is None
