"""Explanation quality: faithfulness to the model, error against a reference, localisation.

Attributions are φ (B, N) for one target class per image (an :class:`~shapkern.explainers.Attribution`'s
``values[..., 0]``; (B, N, 1) is accepted too). Metrics that query the model take a
:class:`~shapkern.games.Game` (``model_game(model, images)``): every model evaluation
goes through the coalition engine, all coalitions of a metric in one call. Per-image results are
(B,) tensors; NaN marks an image where a metric is undefined (constant scores, an empty mask).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from shapkern.coalitions import sample_coalitions
from shapkern.games import Game

__all__ = [
    "auroc",
    "faithfulness_correlation",
    "insertion_deletion",
    "localization",
    "miou_best_threshold",
    "patch_labels",
    "pearson",
    "pointing_game",
    "relative_l2",
    "sensitivity_n",
    "spearman",
    "topk_precision",
]

# What a metric scores: the softmax probability or the logit.
MetricOutput = Literal["prob", "logit"]
METRIC_OUTPUTS: tuple[MetricOutput, ...] = get_args(MetricOutput)


def _scores(phi: torch.Tensor) -> torch.Tensor:
    """(B, N) or (B, N, 1) -> (B, N) float64."""
    if phi.dim() == 3 and phi.shape[-1] == 1:
        phi = phi[..., 0]
    if phi.dim() != 2:
        raise ValueError(f"attributions must be (B, N) or (B, N, 1) for one class, got {tuple(phi.shape)}")
    return phi.double()


def _target_values(game: Game, coalitions: torch.Tensor, target: torch.Tensor, output: MetricOutput):
    """The target class's output on coalitions bool (B, M, N): (B, M) float64."""
    if output not in METRIC_OUTPUTS:
        raise ValueError(f"output must be one of {METRIC_OUTPUTS}, got {output!r}")
    target = torch.as_tensor(target, device=coalitions.device).long().view(-1, 1)
    if target.shape[0] != coalitions.shape[0]:
        raise ValueError(
            f"target must hold one class per image ({coalitions.shape[0]}), got {target.shape[0]}"
        )
    with torch.no_grad():
        values = game(coalitions).double()
    if output == "prob":
        values = values.softmax(-1)
    return values.gather(-1, target.unsqueeze(1).expand(-1, values.shape[1], -1))[..., 0]


def pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation along the last dim: (..., M), (..., M) -> (...); NaN for constant input."""
    x, y = x.double(), y.double()
    x = x - x.mean(-1, keepdim=True)
    y = y - y.mean(-1, keepdim=True)
    denom = (x.square().sum(-1) * y.square().sum(-1)).sqrt()
    return torch.where(denom > 0, (x * y).sum(-1) / denom, torch.nan)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..N along the last dim, ties get their average rank: (..., N) -> (..., N) float64."""
    less = (x.unsqueeze(-1) > x.unsqueeze(-2)).sum(-1)
    equal = (x.unsqueeze(-1) == x.unsqueeze(-2)).sum(-1)
    return less.double() + (equal.double() + 1) / 2


# -- faithfulness -------------------------------------------------------------------------------


def insertion_deletion(game: Game, phi: torch.Tensor, target: torch.Tensor, *, output: MetricOutput = "prob"):
    """Insertion and deletion curves and their areas.

    Insertion adds patches from the most to the least important (by φ), starting from none;
    deletion removes them in the same order, starting from all. Both chains of N+1 nested
    coalitions per image go through the game in one call.

    Args:
        game: coalitions (B, M, N) -> logits (B, M, K).
        phi: (B, N) attributions for ``target``.
        target: (B,) class per image.
        output: ``"prob"`` (softmax probability of the target class) or ``"logit"``.

    Returns:
        dict with ``insertion`` and ``deletion`` (B, N+1) curves at fractions j/N of the patches
        inserted / deleted, and their trapezoidal areas ``insertion_auc``, ``deletion_auc`` (B,).
        Higher insertion and lower deletion AUC mean a more faithful ranking.
    """
    scores = _scores(phi)
    players = scores.shape[1]
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank = order.argsort(-1)  # rank of every patch, 0 = most important
    steps = torch.arange(players + 1, device=scores.device).view(1, -1, 1)
    inserted = rank.unsqueeze(1) < steps  # (B, N+1, N), entry j: the j most important patches
    values = _target_values(game, torch.cat([inserted, ~inserted], 1), target, output)
    insertion, deletion = values[:, : players + 1], values[:, players + 1 :]
    dx = 1.0 / players
    return {
        "insertion": insertion,
        "deletion": deletion,
        "insertion_auc": torch.trapezoid(insertion, dx=dx, dim=-1),
        "deletion_auc": torch.trapezoid(deletion, dx=dx, dim=-1),
    }


def _default_sizes(players: int) -> list[int]:
    return sorted({max(1, round(players * f)) for f in (0.05, 0.1, 0.25, 0.5, 0.75)} - {players})


def sensitivity_n(
    game: Game,
    phi: torch.Tensor,
    target: torch.Tensor,
    *,
    sizes: list[int] | None = None,
    samples: int = 64,
    seed: int = 0,
    output: MetricOutput = "logit",
) -> tuple[list[int], torch.Tensor]:
    """Sensitivity-n (Ancona et al., 2018): for random sets S of n patches, the Pearson correlation
    between Σ_{i∈S} φ_i and the output drop v(N) - v(N∖S) when S is removed.

    Returns:
        (sizes, correlation (B, len(sizes))). One game call for all sizes.
    """
    scores = _scores(phi)
    batch, players = scores.shape
    sizes = _default_sizes(players) if sizes is None else list(sizes)
    if not sizes or any(not 0 < n <= players for n in sizes):
        raise ValueError(f"sizes must lie in 1..{players}, got {sizes}")
    gen = torch.Generator(device=scores.device).manual_seed(seed)
    noise = torch.rand(batch, len(sizes), samples, players, generator=gen, device=scores.device)
    ranks = noise.argsort(-1).argsort(-1)
    removed = ranks < torch.tensor(sizes, device=scores.device).view(1, -1, 1, 1)  # (B, n, S, N)
    full = torch.ones(batch, 1, players, dtype=torch.bool, device=scores.device)
    values = _target_values(game, torch.cat([full, ~removed.flatten(1, 2)], 1), target, output)
    drop = (values[:, :1] - values[:, 1:]).view(batch, len(sizes), samples)
    attributed = torch.einsum("bnsp,bp->bns", removed.double(), scores)
    return sizes, pearson(attributed, drop)


def faithfulness_correlation(
    game: Game,
    phi: torch.Tensor,
    target: torch.Tensor,
    *,
    samples: int = 128,
    seed: int = 0,
    output: MetricOutput = "logit",
) -> torch.Tensor:
    """Pearson correlation, per image, between Σ_{i∈S} φ_i and v(S) - v(∅) over random coalitions S
    (size uniform on 1..N-1, then a uniform subset). 1 for an additive game explained exactly.

    Returns:
        (B,).
    """
    scores = _scores(phi)
    batch, players = scores.shape
    gen = torch.Generator(device=scores.device).manual_seed(seed)
    coalitions = sample_coalitions(batch, samples, players, sampler="uniform", paired=False, generator=gen)
    empty = torch.zeros(batch, 1, players, dtype=torch.bool, device=scores.device)
    values = _target_values(game, torch.cat([empty, coalitions], 1), target, output)
    attributed = torch.einsum("bmn,bn->bm", coalitions.double(), scores)
    return pearson(attributed, values[:, 1:] - values[:, :1])


# -- error against a reference --------------------------------------------------------------------


def relative_l2(phi: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """‖φ - ref‖ / ‖ref‖ per image over all remaining dims: (B, ...) -> (B,)."""
    diff = (phi.double() - reference.double()).flatten(1).norm(dim=1)
    return diff / reference.double().flatten(1).norm(dim=1)


def spearman(phi: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation over the N patches per image (ties get average ranks): (B,)."""
    return pearson(_ranks(_scores(phi)), _ranks(_scores(reference)))


def topk_precision(phi: torch.Tensor, reference: torch.Tensor, k: int) -> torch.Tensor:
    """Fraction of the k highest patches of φ that are among the k highest of the reference: (B,)."""
    scores, ref = _scores(phi), _scores(reference)
    if not 0 < k <= scores.shape[1]:
        raise ValueError(f"k must lie in 1..{scores.shape[1]}, got {k}")
    top = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(k, dim=1).indices, True)
    top_ref = torch.zeros_like(ref, dtype=torch.bool).scatter_(1, ref.topk(k, dim=1).indices, True)
    return (top & top_ref).sum(1).double() / k


# -- localisation against ground-truth masks -------------------------------------------------------


def patch_labels(masks: torch.Tensor, grid: tuple[int, int], *, min_overlap: float = 0.5) -> torch.Tensor:
    """Pixel masks (B, H, W) -> patch labels bool (B, N): patches whose area is at least
    ``min_overlap`` inside the mask. Masks already (B, N) pass through as bool."""
    if masks.dim() == 2:
        return masks.bool()
    if masks.dim() != 3:
        raise ValueError(
            f"masks must be pixel masks (B, H, W) or patch labels (B, N), got {tuple(masks.shape)}"
        )
    height, width = masks.shape[-2:]
    if height % grid[0] or width % grid[1]:
        raise ValueError(f"masks of size {height}x{width} do not split into a {grid[0]}x{grid[1]} patch grid")
    fraction = torch.nn.functional.avg_pool2d(
        masks.double().unsqueeze(1), (height // grid[0], width // grid[1])
    ).flatten(1)
    return fraction >= min_overlap


def pointing_game(phi: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1.0 where the highest-scoring patch lies in the mask, else 0.0; NaN for an empty mask: (B,)."""
    scores, labels = _scores(phi), labels.bool()
    hit = labels.gather(1, scores.argmax(1, keepdim=True))[:, 0].double()
    return torch.where(labels.any(1), hit, torch.nan)


def auroc(phi: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve of φ as a detector of the mask's patches, per image (Mann-Whitney,
    ties count half); NaN when the mask is empty or covers everything: (B,)."""
    scores, labels = _scores(phi), labels.bool()
    positives, negatives = labels.sum(1), (~labels).sum(1)
    rank_sum = (_ranks(scores) * labels).sum(1)
    auc = (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
    return torch.where((positives > 0) & (negatives > 0), auc, torch.nan)


def miou_best_threshold(phi: torch.Tensor, labels: torch.Tensor, *, thresholds: int = 101):
    """Mean IoU over images of {patches with normalised φ >= t} with the mask, at the best t.

    φ is min-max normalised per image to [0, 1]; t runs over ``thresholds`` evenly spaced values.

    Returns:
        (best mIoU, its threshold), as floats.
    """
    scores, labels = _scores(phi), labels.bool()
    low, high = scores.min(1, keepdim=True).values, scores.max(1, keepdim=True).values
    norm = (scores - low) / (high - low).clamp(min=1e-12)
    grid = torch.linspace(0, 1, thresholds, dtype=torch.float64, device=scores.device)
    predicted = norm.unsqueeze(0) >= grid.view(-1, 1, 1)  # (T, B, N)
    inter = (predicted & labels).sum(-1).double()
    union = (predicted | labels).sum(-1).double()
    iou = torch.where(union > 0, inter / union.clamp(min=1), 1.0).mean(1)  # (T,)
    best = int(iou.argmax())
    return float(iou[best]), float(grid[best])


def localization(phi: torch.Tensor, masks: torch.Tensor, grid: tuple[int, int] | None = None) -> dict:
    """Pointing game, AUROC and mIoU at the best threshold, averaged over images (NaN-aware).

    Args:
        phi: (B, N) attributions.
        masks: ground truth, pixel masks (B, H, W) or patch labels (B, N).
        grid: the patch grid (rows, cols) for pixel masks; default square.
    """
    players = _scores(phi).shape[1]
    if grid is None:
        side = round(players**0.5)
        grid = (side, side)
    labels = patch_labels(masks, grid)
    if labels.shape != phi.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match attributions {tuple(phi.shape[:2])}")
    miou, threshold = miou_best_threshold(phi, labels)
    return {
        "pointing": float(pointing_game(phi, labels).nanmean()),
        "auroc": float(auroc(phi, labels).nanmean()),
        "miou": miou,
        "miou_threshold": threshold,
    }
