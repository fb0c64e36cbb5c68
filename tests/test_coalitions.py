import math

import pytest
import torch
from scipy import stats

from shapkern.coalitions import (
    CoalitionSampler,
    all_coalitions,
    permutation_chain,
    sample_coalitions,
    sample_permutations,
    seeded_coalitions,
    shapley_size_distribution,
)


@pytest.mark.parametrize("players", [2, 5, 16, 196])
def test_shapley_size_distribution_matches_formula(players):
    p = shapley_size_distribution(players)
    sizes = torch.arange(1, players, dtype=torch.float64)
    expected = (players - 1) / (sizes * (players - sizes))
    assert p[0] == 0 and p[-1] == 0
    torch.testing.assert_close(p[1:-1], expected / expected.sum())


@pytest.mark.parametrize("players", [6, 16, 49])
def test_shapley_sizes_pass_chi_square(players):
    gen = torch.Generator().manual_seed(players)
    masks = sample_coalitions(50, 400, players, paired=False, generator=gen)
    counts = torch.bincount(masks.sum(-1).view(-1), minlength=players + 1).double()
    p = shapley_size_distribution(players)
    assert counts[0] == 0 and counts[-1] == 0
    expected = p[1:-1] * counts.sum()
    result = stats.chisquare(counts[1:-1].numpy(), expected.numpy())
    assert result.pvalue > 1e-3, result


def test_shapley_subsets_are_uniform_given_size():
    gen = torch.Generator().manual_seed(0)
    masks = sample_coalitions(1, 40000, 8, paired=False, generator=gen)[0]
    # Every player appears equally often in the coalitions of each size.
    for size in (1, 4, 7):
        rows = masks[masks.sum(-1) == size].double()
        freq = rows.mean(0)
        tol = 4 * math.sqrt(size / 8 * (1 - size / 8) / rows.shape[0])
        assert torch.allclose(freq, torch.full_like(freq, size / 8), atol=tol)


def test_paired_interleaves_complements():
    masks = sample_coalitions(3, 10, 13, generator=torch.Generator().manual_seed(1))
    assert masks.shape == (3, 10, 13) and masks.dtype == torch.bool
    assert torch.equal(masks[:, 1::2], ~masks[:, 0::2])


@pytest.mark.parametrize("sampler", ["uniform", "bernoulli"])
def test_other_samplers(sampler):
    masks = sample_coalitions(
        4, 2000, 10, sampler=sampler, paired=False, generator=torch.Generator().manual_seed(2)
    )
    sizes = masks.sum(-1).double()
    assert abs(sizes.mean().item() - 5) < 0.1
    if sampler == "uniform":
        assert sizes.min() >= 1 and sizes.max() <= 9


def test_sampling_is_seeded():
    a = sample_coalitions(2, 8, 9, generator=torch.Generator().manual_seed(5))
    b = sample_coalitions(2, 8, 9, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch": 1, "num": 3, "players": 4}, "even"),
        ({"batch": 1, "num": 2, "players": 4, "sampler": "nope"}, "sampler"),
        ({"batch": 1, "num": 2, "players": 1}, "players"),
        ({"batch": 0, "num": 2, "players": 4}, "positive"),
    ],
)
def test_sample_coalitions_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_coalitions(**kwargs)


def test_all_coalitions_enumerates_every_subset_once():
    chunks = list(all_coalitions(10, coalitions_per_chunk=300))
    masks = torch.cat(chunks)
    assert masks.shape == (1024, 10) and len(chunks) == 4
    ids = (masks.long() << torch.arange(10)).sum(-1)
    assert torch.equal(ids, torch.arange(1024))


def test_all_coalitions_limits():
    with pytest.raises(ValueError, match="players"):
        next(all_coalitions(21))
    first = next(all_coalitions(20, coalitions_per_chunk=8))
    assert first.shape == (8, 20)


def test_permutations_are_paired_by_default():
    """One default per option: samplers pair (antithetic orderings) unless told not to."""
    perms = sample_permutations(2, 6, 7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(perms[:, 1::2], perms[:, 0::2].flip(-1))
    with pytest.raises(ValueError, match="even"):
        sample_permutations(1, 3, 7)
    assert sample_permutations(1, 3, 7, paired=False).shape == (1, 3, 7)


def test_permutations_and_chain():
    perms = sample_permutations(2, 6, 7, paired=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(perms.sort(-1).values, torch.arange(7).expand(2, 6, 7))
    assert torch.equal(perms[:, 1::2], perms[:, 0::2].flip(-1))
    chain = permutation_chain(perms)
    assert chain.shape == (2, 6, 8, 7)
    assert torch.equal(chain.sum(-1), torch.arange(8).expand(2, 6, 8))
    # Step j adds exactly player perms[..., j].
    added = chain[..., 1:, :] & ~chain[..., :-1, :]
    assert torch.equal(added.float().argmax(-1), perms)


@pytest.mark.cuda
@pytest.mark.parametrize("sampler", ["shapley", "uniform", "bernoulli"])
def test_cuda_generator_samples_on_the_gpu(sampler):
    gen = torch.Generator(device="cuda").manual_seed(0)
    masks = sample_coalitions(3, 4, 196, sampler=sampler, generator=gen)
    assert masks.is_cuda and masks.shape == (3, 4, 196)
    assert (masks[:, 0::2] ^ masks[:, 1::2]).all()


def test_seeded_coalitions_depend_only_on_seed_epoch_and_index():
    kw = {"seed": 3, "epoch": 2, "num": 6, "players": 16}
    both = seeded_coalitions(torch.tensor([5, 9]), **kw)
    assert torch.equal(both[1], seeded_coalitions(torch.tensor([9]), **kw)[0])
    assert not torch.equal(both[0], seeded_coalitions(torch.tensor([5]), **(kw | {"epoch": 3}))[0])
    assert torch.equal(both[:, 0], ~both[:, 1])  # paired


def test_coalition_sampler_draws_the_seeded_coalitions_of_its_settings():
    indices = torch.tensor([4, 0, 7])
    default = CoalitionSampler()
    assert (default.num, default.sampler, default.paired, default.seed) == (8, "shapley", True, 0)
    want = seeded_coalitions(indices, seed=0, epoch=2, num=8, players=16)
    assert torch.equal(default(indices, 2, 16), want)  # what the trainer drew before the sampler existed
    unpaired = CoalitionSampler(num=3, sampler="uniform", paired=False, seed=5)(indices, 1, 16)
    want = seeded_coalitions(indices, seed=5, epoch=1, num=3, players=16, sampler="uniform", paired=False)
    assert torch.equal(unpaired, want) and unpaired.shape == (3, 3, 16)
    sizes = unpaired.sum(-1)
    assert (sizes >= 1).all() and (sizes <= 15).all()
    with pytest.raises(AttributeError):
        default.num = 4  # frozen: a run's sampler does not change under it


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num": 3}, "num must be even when paired=True"),
        ({"num": 0}, "num must be a positive int"),
        ({"sampler": "sobol"}, "sampler must be one of"),
        ({"seed": -1}, "seed must be an int"),
    ],
)
def test_coalition_sampler_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CoalitionSampler(**kwargs)
