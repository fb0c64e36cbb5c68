"""The alternatives to ``ShapleyViT`` in a training step (benchmarks/bench_train_step.py): self-explaining
models (``shapkern.games.SelfExplaining``) that ``shapley_step`` runs like a ShapleyViT, computing
Φ(x), f(x) and v_x(S) another way.

- :class:`PairsShapleyViT`: complementary coalitions share one row [prefix, prefix, N patches]
  with a block-diagonal mask (:func:`benchmarks.baselines.pair_features`), the same game as the
  packed engine; optionally under torch.compile.
- :class:`ZeroInputShapleyViT`: v_x(S) from plain forwards of pixel-masked images (a different
  game: absent patches are zeros, not dropped).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

import shapkern
from benchmarks import baselines
from shapkern.engine import masked_input_forward
from shapkern.models import ShapleyOutput

__all__ = ["FlatPhi", "PairsShapleyViT", "ZeroInputShapleyViT"]


def _with_ends(coalitions: torch.Tensor) -> torch.Tensor:
    """Prepend the (full, empty) pair, as ShapleyViT.forward_coalitions does: (B, M, N) -> (B, M + 2, N)."""
    batch, _, players = coalitions.shape
    ends = torch.ones(batch, 2, players, dtype=torch.bool, device=coalitions.device)
    ends[:, 1] = False
    return torch.cat([ends, coalitions], dim=1)


class PairsShapleyViT(nn.Module):
    """A ShapleyViT whose Φ(x), f(x) and v_x(S) come from complementary-pair rows, dense block mask.

    The same computation as ``ShapleyViT.forward_coalitions`` in the dense layout: the full and
    the empty coalition form the first pair of every image; the head runs on every patch token;
    v_x(S) sums the head outputs of S's patches in its row. ``compile`` puts that whole pass under
    torch.compile (default mode).
    """

    def __init__(self, model: shapkern.ShapleyViT, compile: bool = False):
        super().__init__()
        self.model = model
        self.num_players, self.num_classes = model.num_players, model.num_classes
        self._evaluate = torch.compile(self._pair_pass) if compile else self._pair_pass

    def _pair_pass(self, images, coalitions):
        """Per-patch head outputs (B·M/2, N, K) and v_x(S) (B, M, K) of paired coalitions (B, M, N)."""
        model = self.model
        batch, num, players = coalitions.shape
        x = baselines.pair_features(model.backbone, images, coalitions, extra_block=model.head_block)
        phi_tokens = model.head(model.head_norm(x[:, 2 * model.num_prefix_tokens :])).float()
        first = coalitions[:, 0::2].reshape(-1, players)
        members = torch.stack([first, ~first], dim=1).to(phi_tokens.dtype)  # (B·M/2, 2, N)
        return phi_tokens, torch.bmm(members, phi_tokens).view(batch, num, -1)

    def forward(self, images, coalitions, paired=True):
        batch, num, players = coalitions.shape
        phi_tokens, values = self._evaluate(images, _with_ends(coalitions))
        phi = phi_tokens.view(batch, num // 2 + 1, players, -1)[:, 0]
        return ShapleyOutput(phi=phi, logits=phi.sum(dim=1), values=values[:, 2:])

    def coalition_forward(self, images, *, chunk_rows=None, precision="auto", sync_checks=False):
        """v_x(S) (B, M, K) of any paired coalitions of ``images``: the forward-only ℓ_sv targets
        when grad_coalitions < M."""
        _model_dtype_only(precision)
        return lambda coalitions, paired=True: self._evaluate(images, coalitions)[1]


class FlatPhi(nn.Module):
    """(b, C, H, W) -> Φ as (b, N·K): masked_input_forward wants one vector per image."""

    def __init__(self, model: shapkern.ShapleyViT):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).phi.flatten(1)


class ZeroInputShapleyViT(nn.Module):
    """A ShapleyViT whose coalition values come from pixel-masked plain forwards."""

    def __init__(self, model: shapkern.ShapleyViT):
        super().__init__()
        self.model = model
        self.flat_phi = FlatPhi(model)
        self.num_players, self.num_classes = model.num_players, model.num_classes

    def forward(self, images, coalitions, paired=True):
        phi, logits, _ = self.model(images)
        return ShapleyOutput(phi, logits, self._values(images, coalitions))

    def _values(self, images, coalitions, paired=True):
        """v(S) = Σ_{n∈S} Φ(x_S)_n with x_S the image whose absent patches are zeros: (B, M, K)."""
        batch, num, players = coalitions.shape
        masked_phi = masked_input_forward(self.flat_phi, images, coalitions, chunk_rows=1 << 30)
        return (masked_phi.view(batch, num, players, -1) * coalitions.unsqueeze(-1)).sum(2)

    def coalition_forward(self, images, *, chunk_rows=None, precision="auto", sync_checks=False):
        """v(S) (B, M, K) of any coalitions of ``images``, as in :meth:`forward`."""
        _model_dtype_only(precision)
        return partial(self._values, images)


def _model_dtype_only(precision: str) -> None:
    if precision != "auto":
        raise NotImplementedError(f"precision={precision!r}: the baselines run in the model's dtype only")
