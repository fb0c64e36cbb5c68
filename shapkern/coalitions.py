"""Coalition samplers and the packing plan that lays coalitions out as varlen token sequences.

A coalition is a bool mask over the N patches (players) of an image. The packing plan turns
masks (R, N) plus P prefix tokens (CLS, register, distillation; always kept) into the flat
varlen layout of design.md §3: one row per kept token, sequences delimited by ``cu_seqlens``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import torch

__all__ = [
    "PackPlan",
    "all_coalitions",
    "pack_plan",
    "permutation_chain",
    "sample_coalitions",
    "sample_permutations",
    "shapley_size_distribution",
]

MAX_EXACT_PLAYERS = 24


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


def _subsets_of_size(sizes: torch.Tensor, players: int, generator, device) -> torch.Tensor:
    """Uniform random subsets with the given sizes: (...,) int64 -> (..., N) bool."""
    scores = torch.rand(*sizes.shape, players, generator=generator, device=device)
    ranks = scores.argsort(dim=-1).argsort(dim=-1)
    return ranks < sizes.unsqueeze(-1)


def sample_coalitions(
    batch: int,
    num: int,
    players: int,
    *,
    method: str = "shapley",
    paired: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sample ``num`` coalitions of ``players`` patches for each of ``batch`` images.

    Methods:
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
    if generator is not None:
        device = generator.device
    drawn = num // 2 if paired else num
    if method == "shapley":
        # On the generator's device: multinomial takes a generator of its input's device only.
        probs = shapley_size_distribution(players).float().to(device)
        sizes = torch.multinomial(probs, batch * drawn, replacement=True, generator=generator)
        masks = _subsets_of_size(sizes.view(batch, drawn), players, generator, device)
    elif method == "uniform":
        if players < 2:
            raise ValueError(f"players must be >= 2 for method='uniform', got {players}")
        sizes = torch.randint(1, players, (batch, drawn), generator=generator, device=device)
        masks = _subsets_of_size(sizes, players, generator, device)
    elif method == "bernoulli":
        masks = torch.rand(batch, drawn, players, generator=generator, device=device) < 0.5
    else:
        raise ValueError(f"method must be 'shapley', 'uniform' or 'bernoulli', got {method!r}")
    if paired:
        masks = torch.stack([masks, ~masks], dim=2).view(batch, num, players)
    return masks


def all_coalitions(
    players: int, *, chunk_size: int = 1 << 16, device: torch.device | str | None = None
) -> Iterator[torch.Tensor]:
    """All 2^N coalitions in integer order (bit n of i is player n), as bool (chunk, N) chunks."""
    if not 1 <= players <= MAX_EXACT_PLAYERS:
        raise ValueError(f"players must be in 1..{MAX_EXACT_PLAYERS} for enumeration, got {players}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    bits = torch.arange(players, device=device)
    total = 1 << players
    for start in range(0, total, chunk_size):
        ids = torch.arange(start, min(start + chunk_size, total), device=device)
        yield (ids.unsqueeze(-1) >> bits) & 1 == 1


def sample_permutations(
    batch: int,
    num: int,
    players: int,
    *,
    antithetic: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform random orderings of the players: int64 (B, M, N).

    With ``antithetic=True`` (``num`` even) ordering 2i+1 is ordering 2i reversed.
    """
    if antithetic and num % 2:
        raise ValueError(f"num must be even when antithetic=True, got {num}")
    if generator is not None:
        device = generator.device
    drawn = num // 2 if antithetic else num
    perms = torch.rand(batch, drawn, players, generator=generator, device=device).argsort(dim=-1)
    if antithetic:
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


@dataclass
class PackPlan:
    """Where every kept token of R (image, coalition) rows goes in the packed layout.

    Attributes:
        gather_index: (T,) int64 rows of the per-image token table (B * (P + N), D).
        cu_seqlens: (R + 1,) int32 sequence boundaries, FlashAttention varlen convention.
        max_seqlen: upper bound on sequence lengths, P + N (static, so no host sync).
        token_patch: (T,) int64 patch index of each packed token; negative for prefix tokens.
        patch_counts: (R,) int64 kept patches per row.
        row_image: (R,) int64 image index of each row.
        num_prefix_tokens: P.
    """

    gather_index: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    token_patch: torch.Tensor
    patch_counts: torch.Tensor
    row_image: torch.Tensor
    num_prefix_tokens: int

    @property
    def num_tokens(self) -> int:
        return self.gather_index.shape[0]

    @cached_property
    def token_row(self) -> torch.Tensor:
        """(T,) int64 row (sequence) index of every packed token."""
        lengths = self.patch_counts + self.num_prefix_tokens
        return torch.repeat_interleave(
            torch.arange(lengths.shape[0], device=lengths.device), lengths, output_size=self.num_tokens
        )


def pack_plan(
    masks: torch.Tensor, row_image: torch.Tensor, num_prefix_tokens: int, *, paired: bool = False
) -> PackPlan:
    """Plan the packed layout of R coalition rows.

    Args:
        masks: bool (R, N), the kept patches of each row.
        row_image: int64 (R,), the image each row belongs to.
        num_prefix_tokens: P, tokens kept in every row ahead of its patches.
        paired: rows 2i and 2i+1 are complements. Then T is known, R*P + (R/2)*N, and the plan
            makes no host sync; the pairing is checked asynchronously on the device.
            Otherwise T is read back once.

    Each row's sequence is its P prefix tokens followed by its kept patches in patch order.
    """
    rows, players = masks.shape
    width = num_prefix_tokens + players
    if paired:
        if rows % 2:
            raise ValueError(f"paired coalitions need an even number of rows, got {rows}")
        pairs = masks.view(rows // 2, 2, players)
        torch._assert_async((pairs[:, 0] ^ pairs[:, 1]).all(), "coalitions marked paired are not complements")
        total = rows * num_prefix_tokens + rows // 2 * players
    patch_counts = masks.sum(-1)
    keep = torch.cat([masks.new_ones(rows, num_prefix_tokens), masks], dim=1).view(-1)
    if paired:
        flat = torch.nonzero_static(keep, size=total).view(-1)
    else:
        flat = keep.nonzero().view(-1)
    column = flat % width
    lengths = (patch_counts + num_prefix_tokens).to(torch.int32)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return PackPlan(
        gather_index=row_image[flat // width] * width + column,
        cu_seqlens=cu_seqlens,
        max_seqlen=width,
        token_patch=column - num_prefix_tokens,
        patch_counts=patch_counts,
        row_image=row_image,
        num_prefix_tokens=num_prefix_tokens,
    )
