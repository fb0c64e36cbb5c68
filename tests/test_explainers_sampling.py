import math

import pytest
import torch

from shapkern.coalitions import all_coalitions
from shapkern.explainers.sampling import all_subsets, allocate, pair_representatives, sample_design, size_mass


def design_index(z: torch.Tensor) -> torch.Tensor:
    """bool (M, N) -> int64 (M,) position in all_coalitions order (bit n = player n)."""
    return (z.long() << torch.arange(z.shape[1])).sum(-1)


@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("players, budget", [(7, 40), (10, 300), (12, 600), (12, 5000)])
def test_designs_hold_distinct_coalitions_within_the_budget(players, budget, paired):
    design = sample_design(players, budget, paired=paired, seed=1)
    z = design.coalitions
    sizes = z.sum(-1)
    assert ((sizes > 0) & (sizes < players)).all()
    assert torch.unique(z, dim=0).shape[0] == z.shape[0]
    per_unit = 2 if paired else 1
    full = (1 << players) - 2
    assert z.shape[0] == min(full, (budget - 2) // per_unit * per_unit)
    assert design.evaluations == z.shape[0] + 2
    if paired:
        torch.testing.assert_close(z[0::2], ~z[1::2])


def test_border_trick_enumerates_the_small_sizes_and_weights_sum_to_the_population():
    players = 12
    design = sample_design(players, 600, allocation="shapley", paired=True, seed=0)
    sizes = design.coalitions.sum(-1)
    assert (sizes == 1).sum() == 12 and (sizes == 11).sum() == 12
    assert design.drawn[0] == design.population[0] == 12
    assert design.drawn[-1] < design.population[-1]
    sample = design.sample()
    stratum = design.unit_stratum.repeat_interleave(2)
    for h in range(design.drawn.shape[0]):
        rows = stratum == h
        assert math.isclose(
            float(sample.expansion[rows].sum()) / 2, float(design.population[h]), rel_tol=1e-12
        )
    # An enumerated stratum adds no variance; the others the finite-population factor.
    assert sample.factor[0] == 0 and sample.factor[-1] > 0


@pytest.mark.parametrize("allocation", ["shapley", "uniform"])
def test_expansion_weights_are_unbiased(allocation):
    """Σ_j e_j h(S_j) averages to Σ_S h(S) over 0 < |S| < N across seeds (within 4 standard errors)."""
    players, seeds = 10, 300
    every = torch.cat(list(all_coalitions(players)))
    h = torch.randn(every.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sizes = every.sum(-1)
    truth = float(h[(sizes > 0) & (sizes < players)].sum())
    totals = []
    for seed in range(seeds):
        sample = sample_design(players, 130, allocation=allocation, seed=seed).sample()
        totals.append(float((sample.expansion * h[design_index(sample.coalitions)]).sum()))
    totals = torch.tensor(totals, dtype=torch.float64)
    assert abs(float(totals.mean()) - truth) < 4 * float(totals.std()) / seeds**0.5


def test_allocation_shares_follow_the_kernel_or_are_uniform():
    kernel = size_mass(8, "shapley")
    s = torch.arange(1, 8, dtype=torch.float64)
    torch.testing.assert_close(kernel[1:-1], (1 / (s * (8 - s))) / (1 / (s * (8 - s))).sum())
    assert kernel[0] == kernel[-1] == 0
    torch.testing.assert_close(size_mass(8, "uniform")[1:-1], torch.full((7,), 1 / 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="allocation must be one of"):
        size_mass(8, "sqrt")
    sizes, population, drawn, expected = allocate(16, 2048, allocation="shapley")
    assert int(drawn.sum()) == (2048 - 2) // 2
    assert (drawn <= population).all() and ((drawn - expected).abs() < 1 + 1e-9).all()
    with pytest.raises(ValueError, match="budget=3 leaves no coalition"):
        allocate(16, 3)


def test_a_prefix_of_every_stratum_is_a_stratified_design():
    """The rounds of ``tol``: the first k units of each stratum, reweighted by C/k."""
    design = sample_design(14, 1000, allocation="uniform", seed=2)
    counts = torch.minimum(torch.ceil(design.drawn * 0.3).long(), design.drawn)
    sample = design.sample(counts)
    assert sample.coalitions.shape[0] == 2 * int(counts.sum())
    torch.testing.assert_close(sample.coalitions, design.coalitions[sample.rows])
    stratum = design.unit_stratum[sample.rows[0::2] // 2]
    assert torch.equal(torch.bincount(stratum, minlength=counts.shape[0]), counts)
    for h in range(counts.shape[0]):
        first = (design.unit_stratum == h).nonzero().view(-1)[: int(counts[h])]
        assert torch.equal(sample.rows[0::2][stratum == h] // 2, first)
        if counts[h]:
            e = sample.expansion[0::2][stratum == h]
            torch.testing.assert_close(e, torch.full_like(e, float(design.population[h]) / int(counts[h])))


def test_strata_with_one_unit_are_collapsed_for_the_variance():
    design = sample_design(40, 90, seed=0)  # 44 units over 20 strata: several hold one unit
    sample = design.sample()
    ones = ((design.drawn == 1) & (design.drawn < design.population)).nonzero().view(-1)
    assert ones.numel() >= 2
    groups = sample.group[torch.isin(design.unit_stratum, ones)]
    for g in groups.unique():
        size = int((groups == g).sum())
        assert size in (2, 3) and float(sample.factor[g]) == size / (size - 1)
    single = sample_design(40, 90, seed=0).sample(torch.minimum(design.drawn, torch.ones_like(design.drawn)))
    assert (single.factor[single.group.unique()] > 0).all()  # every stratum with one unit: all collapsed


def test_large_populations_draw_distinct_subsets():
    gen = torch.Generator().manual_seed(0)
    z = pair_representatives(196, 3, 5000, gen)
    assert z.shape == (5000, 196) and (z.sum(-1) == 3).all()
    assert torch.unique(z, dim=0).shape[0] == 5000
    half = pair_representatives(8, 4, 35, gen)  # every pair of halves, each once
    assert half[:, 0].all() and torch.unique(half, dim=0).shape[0] == 35
    assert math.comb(10, 3) == all_subsets(10, 3).shape[0]


def test_certain_units_come_first_and_are_not_drawn_again():
    certain = all_subsets(9, 1)
    design = sample_design(9, 200, seed=3, certain=certain)
    torch.testing.assert_close(design.coalitions[0:18:2], certain)
    assert torch.unique(design.coalitions, dim=0).shape[0] == design.coalitions.shape[0] == 198
    with pytest.raises(ValueError, match="certain units need a paired design"):
        sample_design(9, 200, paired=False, certain=certain)
