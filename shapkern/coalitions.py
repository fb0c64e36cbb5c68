"""Coalition samplers: Shapley-kernel subsets, enumeration, permutations and per-sample seeding.

A coalition is a bool mask (..., N) over the N patches (players) of an image; True keeps a patch.
The packed layout that the engine runs coalitions in is in :mod:`shapkern.packed`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from shapkern._deprecation import renamed_arguments

__all__ = [
    "MAX_EXACT_PLAYERS",
    "SAMPLERS",
    "CoalitionSampler",
    "Sampler",
    "all_coalitions",
    "permutation_chain",
    "sample_coalitions",
    "sample_permutations",
    "seeded_coalitions",
    "shapley_size_distribution",
]

MAX_EXACT_PLAYERS = 20  # 2^20 ≈ 1M coalitions per image: the most that enumeration (``exact``) takes
# How coalitions are drawn (see sample_coalitions).
Sampler = Literal["shapley", "uniform", "bernoulli"]
SAMPLERS: tuple[Sampler, ...] = get_args(Sampler)


def shapley_size_distribution(players: int, dtype=torch.float64) -> torch.Tensor:
    """Shapley-kernel distribution of coalition sizes, p(s) ∝ (N-1) / (s (N-s)) for 0 < s < N.

    Returns (N+1,) probabilities; entries 0 and N are zero.
    """
    if players < 2:
        raise ValueError(f"players must be >= 2 for the Shapley kernel, got {players}")
    s = torch.arange(players + 1, dtype=dtype)
    p = torch.zeros(players + 1, dtype=dtype)
    p[1:-1] = (players - 1) / (s[1:-1] * (players - s[1:-1]))
    return p / p.sum()


def _sampling_device(generator: torch.Generator | None, device) -> torch.device | None:
    """Where to sample: the generator's device. A different explicit device is an error, not a
    silent move (torch samples only on its generator's device)."""
    if generator is None:
        return None if device is None else torch.device(device)
    wanted = None if device is None else torch.device(device)
    if wanted is not None and (
        wanted.type != generator.device.type or wanted.index not in (None, generator.device.index)
    ):
        raise ValueError(
            f"device={str(device)!r} but the generator is on {generator.device}; pass a generator on "
            f"{device} or leave device out"
        )
    return generator.device


def _subsets_of_size(sizes: torch.Tensor, players: int, generator, device) -> torch.Tensor:
    """Uniform random subsets with the given sizes: (...,) int64 -> (..., N) bool."""
    scores = torch.rand(*sizes.shape, players, generator=generator, device=device)
    ranks = scores.argsort(dim=-1).argsort(dim=-1)
    return ranks < sizes.unsqueeze(-1)


@renamed_arguments(method="sampler")
def sample_coalitions(
    batch: int,
    num: int,
    players: int,
    *,
    sampler: Sampler = "shapley",
    paired: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sample ``num`` coalitions of ``players`` patches for each of ``batch`` images.

    Samplers:
        - ``"shapley"``: size s drawn exactly from the Shapley kernel p(s) ∝ (N-1)/(s(N-s)),
          0 < s < N, then a uniformly random subset of that size.
        - ``"uniform"``: size uniform on 1..N-1, then a uniformly random subset of that size.
        - ``"bernoulli"``: every player independently with probability 1/2 (uniform over all 2^N
          subsets, empty and full included).

    With ``paired=True`` (``num`` must be even) entry 2i+1 is the complement of entry 2i, so
    every pair holds exactly N patches.

    Returns:
        bool (B, M, N) with B = ``batch``, M = ``num``, N = ``players``.
    """
    if batch < 1 or num < 1 or players < 1:
        raise ValueError(f"batch, num and players must be positive, got {batch}, {num}, {players}")
    if paired and num % 2:
        raise ValueError(f"num must be even when paired=True, got {num}")
    device = _sampling_device(generator, device)
    drawn = num // 2 if paired else num
    if sampler == "shapley":
        # On the generator's device: multinomial takes a generator of its input's device only.
        probs = shapley_size_distribution(players).float().to(device)
        sizes = torch.multinomial(probs, batch * drawn, replacement=True, generator=generator)
        masks = _subsets_of_size(sizes.view(batch, drawn), players, generator, device)
    elif sampler == "uniform":
        if players < 2:
            raise ValueError(f"players must be >= 2 for sampler='uniform', got {players}")
        sizes = torch.randint(1, players, (batch, drawn), generator=generator, device=device)
        masks = _subsets_of_size(sizes, players, generator, device)
    elif sampler == "bernoulli":
        masks = torch.rand(batch, drawn, players, generator=generator, device=device) < 0.5
    else:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if paired:
        masks = torch.stack([masks, ~masks], dim=2).view(batch, num, players)
    return masks


@renamed_arguments(chunk_size="coalitions_per_chunk")
def all_coalitions(
    players: int, *, coalitions_per_chunk: int = 1 << 16, device: torch.device | str | None = None
) -> Iterator[torch.Tensor]:
    """All 2^N coalitions in integer order (bit n of i is player n), as bool (C, N) chunks of
    C = ``coalitions_per_chunk`` coalitions (the last one shorter)."""
    if not 1 <= players <= MAX_EXACT_PLAYERS:
        raise ValueError(f"players must be in 1..{MAX_EXACT_PLAYERS} for enumeration, got {players}")
    if coalitions_per_chunk < 1:
        raise ValueError(f"coalitions_per_chunk must be positive, got {coalitions_per_chunk}")
    bits = torch.arange(players, device=device)
    total = 1 << players
    for start in range(0, total, coalitions_per_chunk):
        ids = torch.arange(start, min(start + coalitions_per_chunk, total), device=device)
        yield (ids.unsqueeze(-1) >> bits) & 1 == 1


@renamed_arguments(antithetic="paired")
def sample_permutations(
    batch: int,
    num: int,
    players: int,
    *,
    paired: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform random orderings of the players: int64 (B, M, N).

    With ``paired=True`` (antithetic; ``num`` even) ordering 2i+1 is ordering 2i reversed.
    """
    if paired and num % 2:
        raise ValueError(f"num must be even when paired=True, got {num}")
    device = _sampling_device(generator, device)
    drawn = num // 2 if paired else num
    perms = torch.rand(batch, drawn, players, generator=generator, device=device).argsort(dim=-1)
    if paired:
        perms = torch.stack([perms, perms.flip(-1)], dim=2).view(batch, num, players)
    return perms


def permutation_chain(perms: torch.Tensor) -> torch.Tensor:
    """The N+1 nested coalitions along each ordering: (..., N) -> bool (..., N+1, N).

    Entry j holds the first j players of the ordering: entry 0 is empty, entry N is full.
    """
    players = perms.shape[-1]
    rank = torch.empty_like(perms)
    rank.scatter_(-1, perms, torch.arange(players, device=perms.device).expand_as(perms))
    steps = torch.arange(players + 1, device=perms.device).view(-1, 1)
    return rank.unsqueeze(-2) < steps


@renamed_arguments(method="sampler")
def seeded_coalitions(
    indices: torch.Tensor,
    *,
    seed: int,
    epoch: int,
    num: int,
    players: int,
    sampler: Sampler = "shapley",
    paired: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Coalitions of each sample from its own generator, seeded by (seed, epoch, sample index).

    They depend neither on the batch a sample lands in nor on the number of processes.

    Args:
        indices: (B,) int dataset indices.

    Returns:
        bool (B, M, N) on ``device``.
    """
    gen = torch.Generator()
    out = []
    for index in indices.tolist():  # B small generators: sampling only, no coalition evaluation
        gen.manual_seed(((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (2**63 - 1))
        out.append(sample_coalitions(1, num, players, sampler=sampler, paired=paired, generator=gen))
    if not out:
        return torch.zeros(0, num, players, dtype=torch.bool, device=device)
    return torch.cat(out).to(device)


@dataclass(frozen=True)
class CoalitionSampler:
    """The coalitions of a training run: ``num`` per sample, drawn by ``sampler`` (``"shapley"``,
    ``"uniform"`` or ``"bernoulli"``, see :func:`sample_coalitions`), in complementary pairs when
    ``paired``, seeded per sample by (``seed``, epoch, sample index) as :func:`seeded_coalitions`.

    ``sampler(indices, epoch, players)`` gives bool (B, M, N); the same seed gives the same
    coalitions whatever the batching and the number of processes.
    """

    num: int = 8
    sampler: Sampler = "shapley"
    paired: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if not isinstance(self.num, int) or isinstance(self.num, bool) or self.num < 1:
            raise ValueError(f"num must be a positive int (coalitions per sample), got {self.num!r}")
        if self.paired and self.num % 2:
            raise ValueError(f"num must be even when paired=True (complementary pairs), got {self.num}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an int in 0..2**63 - 1, got {self.seed!r}")

    def __call__(
        self, indices: torch.Tensor, epoch: int, players: int, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """The coalitions of the samples ``indices`` (B,) in ``epoch``: bool (B, M, N) on ``device``."""
        return seeded_coalitions(
            indices,
            seed=self.seed,
            epoch=epoch,
            num=self.num,
            players=players,
            sampler=self.sampler,
            paired=self.paired,
            device=device,
        )
