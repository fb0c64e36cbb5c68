"""Coalition designs of the regression estimators: distinct coalitions, stratified by size.

A :class:`Design` is a sample of coalitions shared by all images of a batch, drawn on the CPU
from an integer seed (O(budget · N) bits), so a seed gives the same coalitions on any device. A
*unit* is a coalition, or a coalition and its complement (two consecutive rows) when paired. The
*strata* are the coalition sizes, or when paired the complementary size pairs {s, N - s}, s <= N/2.
A stratum whose expected share of the budget reaches its population is enumerated (the border
trick); every other stratum gets a fixed number of distinct coalitions drawn uniformly without
replacement, so no coalition is evaluated twice.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from shapkern.ops import pack_coalitions

__all__ = [
    "ALLOCATIONS",
    "Allocation",
    "Design",
    "Sample",
    "allocate",
    "all_subsets",
    "design_seed",
    "expected_units",
    "sample_design",
    "size_mass",
]

# How the draws spread over coalition sizes: as the Shapley kernel's mass (KernelSHAP) or uniformly
# (LeverageSHAP).
Allocation = Literal["shapley", "uniform"]
ALLOCATIONS: tuple[Allocation, ...] = get_args(Allocation)
_ACC = torch.float64
# Strata of at most this many units are drawn from their enumeration (exact sampling without
# replacement); larger ones by dropping repeated uniform draws.
_ENUMERATE_LIMIT = 1 << 16


def _combinations(players: int, size: int) -> torch.Tensor:
    """Index tuples i_1 < ... < i_size of range(players), int64 (C(N, size), size), lexicographic
    (torch.combinations would materialise N^size candidates first)."""
    combos = torch.zeros(1, 0, dtype=torch.long)
    for _ in range(size):
        last = combos[:, -1] if combos.shape[1] else torch.full((combos.shape[0],), -1)
        room = (players - 1 - last).clamp_min(0)
        rows = torch.repeat_interleave(torch.arange(combos.shape[0]), room)
        start = torch.repeat_interleave(room.cumsum(0) - room, room)
        following = torch.arange(rows.shape[0]) - start + last[rows] + 1
        combos = torch.cat([combos[rows], following.unsqueeze(1)], 1)
    return combos


@functools.lru_cache(maxsize=64)
def all_subsets(players: int, size: int) -> torch.Tensor:
    """Every subset of ``size`` players, bool (C(N, size), N). Cached: index it, never write to it."""
    idx = _combinations(players, size)
    return torch.zeros(idx.shape[0], players, dtype=torch.bool).scatter_(1, idx, True)


def _first_occurrence(rows: torch.Tensor) -> torch.Tensor:
    """bool (M,): True where a row of bool (M, N) does not repeat an earlier row."""
    _, inverse = torch.unique(pack_coalitions(rows), dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), rows.shape[0]).scatter_reduce(
        0, inverse, torch.arange(rows.shape[0]), "amin"
    )
    return first[inverse] == torch.arange(rows.shape[0])


def _distinct_subsets(players: int, size: int, count: int, generator, exclude=None) -> torch.Tensor:
    """``count`` distinct uniformly random subsets of ``size`` players, none among ``exclude``
    (bool (E, N) of that size, distinct): bool (count, N).

    Small populations: a random prefix of the enumeration. Large ones: uniform draws, repeats
    dropped (a rule symmetric in the players keeps the kept set uniform), until enough.
    """
    exclude = torch.zeros(0, players, dtype=torch.bool) if exclude is None else exclude
    total = math.comb(players, size) - exclude.shape[0]
    if count > total:
        raise ValueError(f"cannot draw {count} more distinct subsets of {size} from {players} players")
    if total + exclude.shape[0] <= _ENUMERATE_LIMIT:
        every = all_subsets(players, size)
        if exclude.shape[0]:
            every = every[_first_occurrence(torch.cat([exclude, every]))[exclude.shape[0] :]]
        return every[torch.randperm(total, generator=generator)[:count]]
    kept = exclude
    while kept.shape[0] < count + exclude.shape[0]:
        need = count + exclude.shape[0] - kept.shape[0]
        scores = torch.rand(need + need // 4 + 8, players, generator=generator)
        new = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(size, 1).indices, True)
        fresh = _first_occurrence(torch.cat([kept, new]))[kept.shape[0] :]
        kept = torch.cat([kept, new[fresh.nonzero().view(-1)[:need]]])
    return kept[exclude.shape[0] :]


def pair_representatives(players: int, size: int, count: int, generator, exclude=None) -> torch.Tensor:
    """``count`` distinct coalitions of ``size`` <= N/2, each standing for the pair {S, N∖S}, none
    among ``exclude``; at size N/2 the representative holds player 0, so no pair comes twice.
    bool (count, N)."""
    if 2 * size != players:
        return _distinct_subsets(players, size, count, generator, exclude)
    rest = _distinct_subsets(
        players - 1, size - 1, count, generator, None if exclude is None else exclude[:, 1:]
    )
    return torch.cat([torch.ones(count, 1, dtype=torch.bool), rest], 1)


def design_seed(seed: int | None) -> int:
    """The integer seed of a design drawn on the CPU; None draws a fresh one."""
    return torch.Generator().seed() >> 2 if seed is None else int(seed)


def size_mass(players: int, allocation: Allocation) -> torch.Tensor:
    """Share of the draws per coalition size, (N+1,) float64, zero at 0 and N: ``"shapley"``, the
    Shapley kernel's mass ∝ 1/(s(N-s)); ``"uniform"``, uniform (the leverage score of a coalition
    in the Shapley regression is ∝ 1/C(N, s), Musco & Witter 2025)."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    s = torch.arange(1, players, dtype=_ACC)
    mass = torch.zeros(players + 1, dtype=_ACC)
    mass[1:-1] = 1 / (s * (players - s)) if allocation == "shapley" else 1.0
    return mass / mass.sum()


def _strata(players: int, paired: bool) -> list[tuple[int, int, int]]:
    """(size, population in units, sizes covered) per stratum; paired: sizes s <= N/2, a unit is a
    coalition of size s and its complement (at s = N/2 each pair counts once)."""
    if not paired:
        return [(s, math.comb(players, s), 1) for s in range(1, players)]
    return [
        (s, math.comb(players, s) // (2 if 2 * s == players else 1), 1 if 2 * s == players else 2)
        for s in range(1, players // 2 + 1)
    ]


def expected_units(
    players: int,
    budget: int,
    *,
    allocation: Allocation = "shapley",
    paired: bool = True,
    taken: torch.Tensor | None = None,
):
    """Expected units per stratum for a budget that counts v(∅) and v(N).

    Border trick: a stratum whose expected units reach its population is enumerated, its units
    leave the budget and the other shares are renormalised, until none does. ``taken`` (H,) int64:
    units already in the sample per stratum (they count against the budget and leave the
    population).

    Returns:
        sizes (H,) int64, population left (H,) float64, expected units (H,) float64.
    """
    strata = _strata(players, paired)
    taken = torch.zeros(len(strata), dtype=torch.long) if taken is None else taken
    sizes = torch.tensor([s for s, _, _ in strata])
    population = torch.tensor([c for _, c, _ in strata], dtype=_ACC) - taken
    units = (budget - 2) // (2 if paired else 1) - int(taken.sum())
    if units < 1:
        raise ValueError(f"budget={budget} leaves no coalition to draw besides ∅, N and those taken")
    if units >= population.sum():
        return sizes, population, population
    mass = size_mass(players, allocation)
    share = torch.tensor([float(mass[s] * cover) for s, _, cover in strata], dtype=_ACC)
    full, left = population == 0, float(units)
    while True:
        expected = left * share * ~full / share[~full].sum()
        grow = ~full & (expected >= population)
        if not grow.any():
            break
        full |= grow
        left -= float(population[grow].sum())
    return sizes, population, torch.where(full, population, expected)


def allocate(
    players: int,
    budget: int,
    *,
    allocation: Allocation = "shapley",
    paired: bool = True,
    taken: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
):
    """Units per stratum: :func:`expected_units` split by systematic rounding (one uniform offset
    from ``generator``: each stratum gets the floor or the ceiling of its expected units, and the
    total is exact).

    Returns:
        sizes (H,) int64, population left (H,) float64, units drawn (H,) int64, expected units (H,).
    """
    sizes, population, expected = expected_units(
        players, budget, allocation=allocation, paired=paired, taken=taken
    )
    offset = float(torch.rand(1, generator=generator, dtype=_ACC))
    edges = torch.cat([torch.zeros(1, dtype=_ACC), expected.cumsum(0)])
    counts = torch.floor(edges[1:] + offset) - torch.floor(edges[:-1] + offset)
    return sizes, population, torch.minimum(counts, population).long(), expected


@dataclass
class Sample:
    """Rows of a design with their regression weights and variance strata.

    Attributes:
        coalitions: bool (M, N); units of ``per_unit`` consecutive rows.
        rows: (M,) int64, the rows' indices in the design.
        expansion: (M,) float64, population over units of the row's stratum: Σ_j e_j h(S_j) is an
            unbiased estimate of Σ_S h(S) over 0 < |S| < N.
        group: (U,) int64, variance stratum of each unit (a stratum, or a collapsed set of strata
            holding one unit each).
        factor: (H,) float64, multiplier of each variance stratum's sum of squared deviations:
            (1 - m/C) m/(m - 1), m/(m - 1) for a collapsed one, 0 for an enumerated one.
        per_unit: 2 if paired, else 1.
    """

    coalitions: torch.Tensor
    rows: torch.Tensor
    expansion: torch.Tensor
    group: torch.Tensor
    factor: torch.Tensor
    per_unit: int


@dataclass
class Design:
    """A stratified design: units stored stratum by stratum, each stratum's in random order, so the
    first k units of a stratum are a uniform sample of k (see :meth:`sample`).

    Attributes:
        coalitions: bool (M, N), M = U · per_unit.
        unit_stratum: (U,) int64.
        population: (H,) float64, units per stratum in the population.
        expected: (H,) float64, units the allocation expected (the population where enumerated).
        drawn: (H,) int64, units in the design.
        per_unit: 2 if paired, else 1.
    """

    coalitions: torch.Tensor
    unit_stratum: torch.Tensor
    population: torch.Tensor
    expected: torch.Tensor
    drawn: torch.Tensor
    per_unit: int

    @property
    def evaluations(self) -> int:
        """Coalitions evaluated per image for the whole design, v(∅) and v(N) included."""
        return self.coalitions.shape[0] + 2

    def sample(self, counts: torch.Tensor | None = None) -> Sample:
        """The first ``counts`` (H,) int64 units of every stratum (default: all), weighted to be
        unbiased: C/k post-stratified where a stratum expects a unit or more, Horvitz-Thompson
        C/E[m] below (there it holds 0 or 1 unit)."""
        counts = self.drawn if counts is None else torch.minimum(counts, self.drawn)
        units = self.unit_stratum.shape[0]
        start = torch.full_like(self.drawn, units).scatter_reduce(
            0, self.unit_stratum, torch.arange(units), "amin"
        )
        rank = torch.arange(units) - start[self.unit_stratum]
        keep = (rank < counts[self.unit_stratum]).nonzero().view(-1)
        rows = (keep.unsqueeze(1) * self.per_unit + torch.arange(self.per_unit)).view(-1)
        k = counts.to(_ACC)
        e = torch.where(self.expected >= 1, self.population / k.clamp_min(1), self.population / self.expected)
        group = torch.arange(counts.shape[0])
        factor = torch.where(counts >= 2, (1 - k / self.population) * k / (k - 1).clamp_min(1), 0.0)
        # One unit gives no variance: collapse such strata in twos (a threefold last), conservatively.
        singles = ((counts == 1) & (k < self.population)).nonzero().view(-1).tolist()
        pairs = len(singles) // 2
        lead = [singles[2 * min(j // 2, pairs - 1)] for j in range(len(singles))] if pairs else []
        for h, g in zip(singles, lead, strict=False):
            group[h] = g
        for g in set(lead):
            size = lead.count(g)
            factor[g] = size / (size - 1)
        stratum = self.unit_stratum[keep]
        return Sample(
            coalitions=self.coalitions[rows],
            rows=rows,
            expansion=e[stratum].repeat_interleave(self.per_unit),
            group=group[stratum],
            factor=factor,
            per_unit=self.per_unit,
        )


def sample_design(
    players: int,
    budget: int,
    *,
    allocation: Allocation = "shapley",
    paired: bool = True,
    seed: int = 0,
    certain: torch.Tensor | None = None,
) -> Design:
    """The stratified design of a budget (counting v(∅) and v(N)), drawn on the CPU from ``seed``.

    Args:
        players: N >= 2.
        budget: evaluations per image; the design holds 2 · ⌊(budget - 2) / 2⌋ rows when paired
            (budget - 2 unpaired), or every coalition when the budget covers them.
        allocation: draws per size, ``"shapley"`` (the Shapley kernel's mass, KernelSHAP) or
            ``"uniform"`` (LeverageSHAP).
        paired: every coalition with its complement.
        seed: seeds the draws.
        certain: pair representatives bool (G, N) (paired only; sizes <= N/2, holding player 0 at
            size N/2) taken with certainty as one more, enumerated stratum whose rows come first;
            they count against the budget and are not drawn again.
    """
    if players < 2:
        raise ValueError(f"players must be >= 2, got {players}")
    if certain is not None and not paired:
        raise ValueError("certain units need a paired design")
    gen = torch.Generator().manual_seed(seed)
    certain = torch.zeros(0, players, dtype=torch.bool) if certain is None else certain
    sizes = [s for s, _, _ in _strata(players, paired)]
    by_size = [certain[certain.sum(-1) == s] for s in sizes]
    taken = torch.tensor([c.shape[0] for c in by_size], dtype=torch.long)
    _, population, drawn, expected = allocate(
        players, budget, allocation=allocation, paired=paired, taken=taken, generator=gen
    )
    rows, unit_stratum = [], []
    if certain.shape[0]:
        rows.append(torch.stack([certain, ~certain], 1).flatten(0, 1))
        unit_stratum.append(torch.full((certain.shape[0],), len(sizes), dtype=torch.long))
    for h, (size, m) in enumerate(zip(sizes, drawn.tolist(), strict=True)):
        if m == 0:
            continue
        if paired:
            z = pair_representatives(players, size, m, gen, by_size[h])
            z = torch.stack([z, ~z], 1).flatten(0, 1)
        else:
            z = _distinct_subsets(players, size, m, gen)
        rows.append(z)
        unit_stratum.append(torch.full((m,), h, dtype=torch.long))
    extra = torch.full((1 if certain.shape[0] else 0,), float(certain.shape[0]), dtype=_ACC)
    return Design(
        coalitions=torch.cat(rows),
        unit_stratum=torch.cat(unit_stratum),
        population=torch.cat([population, extra]),
        expected=torch.cat([expected, extra]),
        drawn=torch.cat([drawn, extra.long()]),
        per_unit=2 if paired else 1,
    )
