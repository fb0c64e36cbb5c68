"""What a coalition game is: the :class:`Game` protocol, a game from any function, a tabulated game,
and the :class:`SelfExplaining` protocol of models that output their own Shapley values."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from shapkern.engine import Precision

__all__ = ["Game", "Restrictable", "SelfExplaining", "TabulatedGame", "ValueFunction", "restrict"]


@runtime_checkable
class Game(Protocol):
    """A cooperative game per image: coalitions bool (B, M, N) -> values (B, M, K).

    Attributes:
        players: N. batch: B. device: where coalitions must live.
    """

    players: int
    batch: int
    device: torch.device

    def __call__(self, coalitions: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class SelfExplaining(Protocol):
    """A model that outputs every patch's Shapley value for every class, Φ(x) (B, N, K), and
    predicts their sum f(x) = Σ_n Φ(x)_n (a :class:`shapkern.ShapleyViT`).

    ``model(images, coalitions=None, *, paired=None)`` returns (phi (B, N, K), logits (B, K),
    values (B, M, K) or None), one packed pass; ``coalition_forward(images, *, chunk_rows,
    precision, sync_checks)`` returns a function of coalitions (B, M, N) -> v_x(S) (B, M, K) with
    the images checked once.
    """

    num_players: int
    num_classes: int

    def __call__(self, images: torch.Tensor, coalitions: torch.Tensor | None = None, *, paired=None): ...

    def coalition_forward(
        self,
        images: torch.Tensor,
        *,
        chunk_rows: int | None = None,
        precision: Precision = "auto",
        sync_checks: bool = False,
    ) -> Callable[..., torch.Tensor]: ...


class Restrictable:
    """``game.select(target)``: the game restricted to some outputs (see :func:`restrict`). A base
    of the games: they set ``players``, ``batch`` and ``device`` and define ``__call__``."""

    players: int
    batch: int
    device: torch.device

    def __call__(self, coalitions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def select(self, target: torch.Tensor) -> ValueFunction:
        """The game restricted to the outputs ``target`` (B, K_t) int64: values (B, M, K_t)."""
        return restrict(self, target)


@dataclass
class ValueFunction(Restrictable):
    """A game from any function: ``fn`` maps coalitions bool (B, M, N) to values (B, M, K).

    Attributes:
        fn: the callable. batch: B. players: N. device: where coalitions must live.
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    batch: int
    players: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __call__(self, coalitions: torch.Tensor) -> torch.Tensor:
        return self.fn(coalitions)


def restrict(game: Game, target: torch.Tensor) -> ValueFunction:
    """The game restricted to the outputs ``target`` (B, K_t) int64: values (B, M, K_t)."""

    def fn(coalitions: torch.Tensor) -> torch.Tensor:
        values = game(coalitions)
        return values.gather(-1, target.unsqueeze(1).expand(-1, values.shape[1], -1))

    return ValueFunction(fn, game.batch, game.players, game.device)


class TabulatedGame(Restrictable):
    """A game given by its whole table, for tests and benchmarks: ``table`` (B, 2^N, K), the value of
    coalition z at index Σ_n z_n 2^n. ``calls`` (a list), when given, collects the coalitions
    (B, M, N) of every call."""

    def __init__(self, table: torch.Tensor, calls: list | None = None):
        if table.dim() != 3 or table.shape[1] & (table.shape[1] - 1):
            raise ValueError(f"table must be (B, 2^N, K), got {tuple(table.shape)}")
        self.table, self.calls = table, calls
        self.batch, self.players, self.device = table.shape[0], table.shape[1].bit_length() - 1, table.device

    @staticmethod
    def index(coalitions: torch.Tensor) -> torch.Tensor:
        """bool (..., N) -> int64 (...) table indices Σ_n z_n 2^n."""
        bits = torch.arange(coalitions.shape[-1], device=coalitions.device)
        return (coalitions.long() << bits).sum(-1)

    def __call__(self, coalitions: torch.Tensor) -> torch.Tensor:
        if self.calls is not None:
            self.calls.append(coalitions.clone())
        index = self.index(coalitions)  # (B, M)
        return torch.gather(self.table, 1, index.unsqueeze(-1).expand(-1, -1, self.table.shape[-1]))
