import itertools
import math

import torch

from shapkern.coalitions import all_coalitions
from shapkern.explainers.estimators.bayes import greedy_pairs, odd_walsh_covariance


def test_odd_walsh_covariance_matches_its_definition():
    """k(d), the Shapley covariances and the prior variance of φ_i, against the explicit sum over odd
    Walsh functions χ_T (|T| >= 3) with variance ρ^|T| / C(N, |T|)."""
    n, rho = 7, 0.4
    k, sv, var_phi = odd_walsh_covariance(n, rho)
    x = 2 * torch.cat(list(all_coalitions(n))).double() - 1
    subsets = [c for t in range(3, n + 1, 2) for c in itertools.combinations(range(n), t)]
    chi = torch.stack([x[:, list(c)].prod(-1) for c in subsets], 1)  # (2^N, T)
    var = torch.tensor([rho ** len(c) / math.comb(n, len(c)) for c in subsets], dtype=torch.float64)
    dist = ((n - x @ x.T) / 2).round().long()
    torch.testing.assert_close((chi * var) @ chi.T, k[dist])
    share = torch.zeros(n, len(subsets), dtype=torch.float64)  # χ_T is worth 2/|T| to each i in T
    for j, c in enumerate(subsets):
        share[list(c), j] = 2 / len(c)
    others = (x > 0).sum(-1, keepdim=True) - (x > 0).long()
    torch.testing.assert_close((chi * var) @ share.T, x * sv[others])
    torch.testing.assert_close(torch.tensor(var_phi, dtype=torch.float64), (share.square() * var).sum(1)[0])


def test_greedy_pairs_are_distinct_representatives_with_every_singleton_first():
    n, units = 12, 60
    reps = greedy_pairs(n, units, seed=0)
    assert reps.shape == (units, n) and (reps.sum(-1) <= n // 2).all() and (reps.sum(-1) >= 1).all()
    torch.testing.assert_close(reps[:n], torch.eye(n, dtype=torch.bool))
    both = torch.cat([reps, ~reps])
    assert torch.unique(both, dim=0).shape[0] == 2 * units  # no pair twice, in either orientation
    assert torch.equal(greedy_pairs(n, units, seed=0), reps) and not torch.equal(
        greedy_pairs(n, units, seed=1), reps
    )
    few = greedy_pairs(n, 5, seed=0)  # fewer units than players: no forced singletons
    assert few.shape == (5, n) and torch.unique(few, dim=0).shape[0] == 5


def test_greedy_pairs_lower_the_posterior_variance_of_a_random_design():
    """The point of the greedy design: Σ_i Var(φ_i | pairs) under the prior is below a random design's."""
    n, units = 10, 40
    k, sv, var_phi = odd_walsh_covariance(n, 0.3)

    def posterior_variance(reps):
        x = 2 * reps.double() - 1
        gram = k[((n - x @ x.T) / 2).round().long()] + 1e-10 * torch.eye(units, dtype=torch.float64)
        cov = x * sv[(x > 0).sum(-1, keepdim=True) - (x > 0).long()]
        return float(n * var_phi - (cov * torch.linalg.solve(gram, cov)).sum())

    greedy = posterior_variance(greedy_pairs(n, units, seed=0))
    gen = torch.Generator().manual_seed(0)
    pool = torch.cat(list(all_coalitions(n)))
    pool = pool[(pool.sum(-1) >= 1) & (pool.sum(-1) < 5)]  # sizes 1..4 hold one side of every pair but 5
    random = [
        posterior_variance(pool[torch.randperm(pool.shape[0], generator=gen)[:units]]) for _ in range(5)
    ]
    assert greedy < 0.3 * min(random), (greedy, random)
