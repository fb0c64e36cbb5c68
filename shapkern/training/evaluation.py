"""What a run measures on held-out data, as callbacks the trainer is given.

Each evaluator maps (model, test set, device) to a dict of metrics that goes into the epoch's
record; :func:`default_evaluators` builds the ones ``shapkern train`` uses. :func:`save_heatmaps`
draws the final picture of a run.
"""

from __future__ import annotations

from collections.abc import Callable, Sized
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from shapkern.checkpoint import atomic_write
from shapkern.coalitions import CoalitionSampler, Sampler
from shapkern.data import EvidenceDataset
from shapkern.engine import patch_grid
from shapkern.explainers.explain import explain  # the function (the package also names its module)
from shapkern.explainers.metrics import localization, relative_l2
from shapkern.models import ShapleyCLIP, ShapleyViT
from shapkern.training.config import TrainConfig
from shapkern.training.distributed import autocast
from shapkern.training.losses import shapley_regression_loss
from shapkern.training.retrieval import (
    CaptionFaithfulness,
    Retrieval,
    TextLocalization,
    save_caption_heatmaps,
)

__all__ = [
    "EVAL_EPOCH",
    "Evaluator",
    "Faithfulness",
    "HeldOutLoss",
    "Localisation",
    "default_evaluators",
    "metric_labels",
    "save_heatmaps",
]

Evaluator = Callable[[Any, Any, torch.device], dict]  # (the task's model, its test set, device)
EVAL_EPOCH = -1  # coalition seed "epoch" of the held-out ℓ_sv, the same at every evaluation


@dataclass
class HeldOutLoss:
    """Test accuracy and raw ℓ_sv on fixed coalitions (the same at every evaluation), drawn as the
    run draws its own (``sampler``, ``paired``)."""

    num_coalitions: int
    seed: int
    batch_size: int = 64
    sampler: Sampler = "shapley"
    paired: bool = True

    @torch.no_grad()
    def __call__(self, model: ShapleyViT, test_set: Dataset, device: torch.device) -> dict:
        correct = count = 0
        sv = 0.0
        draw = CoalitionSampler(self.num_coalitions, self.sampler, self.paired, self.seed)
        for images, labels, indices in DataLoader(test_set, batch_size=self.batch_size):
            images, labels = images.to(device), labels.to(device)
            coalitions = draw(indices, EVAL_EPOCH, model.num_players, device)
            with autocast(device):
                out = model(images, coalitions, paired=self.paired)
            correct += int((out.logits.argmax(-1) == labels).sum())
            sv += float(shapley_regression_loss(out.phi, out.values, coalitions)) * labels.shape[0]
            count += labels.shape[0]
        return {"test_acc": correct / max(count, 1), "test_sv": sv / max(count, 1)}


@dataclass
class Faithfulness:
    """‖Φ - φ‖/‖φ‖ of the model's one-pass Φ against a permutation-sampling estimate of its own
    Shapley values, on the first ``images`` test images."""

    images: int
    permutations: int
    seed: int

    @torch.no_grad()
    def __call__(self, model: ShapleyViT, test_set: Dataset, device: torch.device) -> dict:
        count = min(self.images, len(cast(Sized, test_set)))  # map-style datasets have a length
        images = torch.stack([test_set[i][0] for i in range(count)]).to(device)
        pairs = max(2, self.permutations // 2)  # antithetic pairs of orderings
        budget = 2 + 2 * pairs * (model.num_players - 1)  # ∅ and N once, N - 1 per ordering
        with autocast(device):
            phi = model(images).phi
            ref = explain(
                model,
                images,
                method="permutation",
                budget=budget,
                target="all",
                seed=self.seed,
                progress=False,
            ).values
        return {"faithfulness_rel_err": float(relative_l2(phi, ref).mean())}


def _evidence_masks(test_set: Dataset, grid: tuple[int, int]) -> torch.Tensor | None:
    """Ground-truth patch labels bool (n, N) of a test set with evidence masks (``evidence``, or a
    Subset of it: ``limit_test``), patches at least half inside the evidence as ``shapkern explain``
    scores them; None for data without masks."""
    indices: list[int] | None = None
    while isinstance(test_set, Subset):
        inner = list(test_set.indices)
        indices = inner if indices is None else [inner[i] for i in indices]
        test_set = test_set.dataset
    if not isinstance(test_set, EvidenceDataset):
        return None
    masks = test_set.patch_masks(grid) >= 0.5
    return masks if indices is None else masks[indices]


@dataclass
class Localisation:
    """Pointing game, AUROC and mIoU at the best threshold of the one-pass Φ of the predicted class
    against the test set's evidence masks, as ``shapkern explain`` scores an explanation (every test
    image: one forward pass each). An empty record for data without masks."""

    batch_size: int = 256

    @torch.no_grad()
    def __call__(self, model: ShapleyViT, test_set: Dataset, device: torch.device) -> dict:
        masks = _evidence_masks(test_set, patch_grid(model, model.num_players))
        if masks is None:
            return {}
        maps = []
        for images, *_ in DataLoader(test_set, batch_size=self.batch_size):
            with autocast(device):
                out = model(images.to(device))
            pred = out.logits.argmax(-1)
            maps.append(out.phi[torch.arange(pred.shape[0]), :, pred].float().cpu())
        scores = localization(torch.cat(maps), masks)
        return {key: scores[key] for key in ("pointing", "auroc", "miou")}


def default_evaluators(cfg: TrainConfig) -> list[Evaluator]:
    """Held-out accuracy and ℓ_sv, faithfulness when ``cfg.faith_images`` > 0, and localisation on
    data with evidence masks; for image-text, :func:`image_text_evaluators`."""
    if cfg.task == "image-text":
        return image_text_evaluators(cfg)
    held_out = HeldOutLoss(cfg.num_coalitions, cfg.seed, max(64, cfg.batch_size), cfg.sampler, cfg.paired)
    evaluators: list[Evaluator] = [held_out, Localisation(max(64, cfg.batch_size))]
    if cfg.faith_images > 0:
        evaluators.append(Faithfulness(cfg.faith_images, cfg.faith_permutations, cfg.seed))
    return evaluators


def metric_labels(cfg: TrainConfig) -> dict[str, str]:
    """What the evaluators' metrics are, for the epoch lines and the summary: record key -> label."""
    return {
        "test_acc": "test accuracy",
        "test_sv": "held-out ℓ_sv",
        # A sampled reference, not exact values; and not the faithfulness-correlation metric.
        "faithfulness_rel_err": f"‖Φ − φ‖/‖φ‖ vs a {cfg.faith_permutations}-permutation estimate",
        "pointing": "pointing game (evidence masks)",
        "auroc": "AUROC of Φ on the evidence masks",
        "miou": "mIoU with the evidence masks",
        "test_r1_i2t": "recall@1 image→text",
        "test_r1_t2i": "recall@1 text→image",
        "test_pointing": "pointing game (text query)",
    }


def image_text_evaluators(cfg: TrainConfig) -> list[Evaluator]:
    """Retrieval recall and held-out ℓ_sv, localisation from the text query (sets with masks), and
    faithfulness when ``cfg.faith_images`` > 0."""
    retrieval = Retrieval(cfg.num_coalitions, cfg.seed, max(64, cfg.batch_size), cfg.sampler, cfg.paired)
    evaluators: list[Evaluator] = [retrieval, TextLocalization(images=64)]
    if cfg.faith_images > 0:
        evaluators.append(CaptionFaithfulness(cfg.faith_images, cfg.faith_permutations, cfg.seed))
    return evaluators


@torch.no_grad()
def save_heatmaps(
    model: ShapleyViT | ShapleyCLIP, test_set: Dataset, path: str, *, count: int, classes=None
) -> None:
    """A PNG grid of the first ``count`` test images, each overlaid with Φ of its predicted class (for
    an image-text model, the first ``count`` test captions, each with its heatmap)."""
    from shapkern.explainers.viz import plot_grid  # matplotlib: imported where a figure is drawn

    if isinstance(model, ShapleyCLIP):
        return save_caption_heatmaps(model, cast(Any, test_set), path, count=count)

    count = min(count, len(cast(Sized, test_set)))
    device = next(model.parameters()).device
    images = torch.stack([test_set[i][0] for i in range(count)]).to(device)
    labels = [int(test_set[i][1]) for i in range(count)]
    model.eval()
    out = model(images)
    pred = out.logits.argmax(-1)
    name = (lambda c: classes[c]) if classes else str
    titles = [f"pred {name(int(p))}, true {name(y)}" for p, y in zip(pred, labels, strict=False)]
    maps = out.phi[torch.arange(count), :, pred].float().cpu()
    grid = patch_grid(model, model.num_players)
    caption = (
        "Φ(x) of the predicted class, from one forward pass. Red: the patch raises that class's logit, "
        "blue: lowers it; each image on its own scale (±1: its largest |Φ|)"
    )
    fig = plot_grid(images.float().cpu(), maps, titles=titles, grid=grid, dpi=110, caption=caption)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
