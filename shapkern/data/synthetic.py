"""Datasets that ship with shapkern: nothing to download.

- ``digits``: scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes), upsampled
  to ``img_size`` (32 by default: with 8×8 patches, 16 players, so exact Shapley values take
  2^16 coalitions).
- ``evidence``: a procedurally generated, seeded dataset on a 4×4 grid of cells. A few cells hold
  the pattern of the image's class, the others hold distractor patterns; every image comes with
  its ground-truth evidence mask, so localisation can be scored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shapkern.data.datasets import DataBundle, EvidenceDataset, TensorImageDataset
from shapkern.data.preprocess import Preprocessing

__all__ = ["EVIDENCE_GRID", "digits", "evidence", "make_evidence"]

EVIDENCE_GRID = 4


def _normalise(train: torch.Tensor, test: torch.Tensor):
    """Standardise both splits with the training split's statistics: (train, test, (mean, std))."""
    mean, std = train.mean(), train.std()
    return (train - mean) / std, (test - mean) / std, (float(mean), float(std))


def digits(img_size: int = 32, *, test_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    """scikit-learn's 8×8 digits, bilinearly upsampled to img_size, as 3 equal channels, standardised.

    The split is stratified and fixed by ``seed`` (1,437 train / 360 test at the default).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    images = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    labels = torch.tensor(raw.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=test_fraction, random_state=seed, stratify=raw.target
    )
    train, test, (mean, std) = _normalise(images[train_idx], images[test_idx])
    return DataBundle(
        name="digits",
        train=TensorImageDataset(train.expand(-1, 3, -1, -1).contiguous(), labels[train_idx]),
        test=TensorImageDataset(test.expand(-1, 3, -1, -1).contiguous(), labels[test_idx]),
        num_classes=10,
        in_chans=3,
        img_size=img_size,
        classes=[str(i) for i in range(10)],
        preprocessing=Preprocessing(color="L", mean=(mean,), std=(std,), channels=3),
    )


def make_evidence(
    num: int,
    *,
    img_size: int = 32,
    num_classes: int = 4,
    evidence_cells: int = 2,
    num_distractors: int = 12,
    noise: float = 0.3,
    seed: int = 0,
    pattern_seed: int = 1234,
) -> EvidenceDataset:
    """Generate the evidence dataset: images (num, 3, S, S) on a 4×4 grid of (S/4)² cells.

    Each class c owns one random ±1 colour pattern; an image of class c shows it in
    ``evidence_cells`` random cells (its evidence mask). The other cells show patterns drawn from
    a bank of ``num_distractors`` patterns no class owns, so only the evidence cells decide the
    class. Gaussian pixel noise of std ``noise`` is added. ``pattern_seed`` fixes the patterns
    (shared by train and test); ``seed`` fixes the images.
    """
    if img_size % EVIDENCE_GRID:
        raise ValueError(f"evidence images need an img_size divisible by {EVIDENCE_GRID}, got {img_size}")
    cells = EVIDENCE_GRID * EVIDENCE_GRID
    if not 1 <= evidence_cells < cells:
        raise ValueError(f"evidence_cells must be in 1..{cells - 1}, got {evidence_cells}")
    cell = img_size // EVIDENCE_GRID
    bank = torch.Generator().manual_seed(pattern_seed)
    patterns = torch.randint(0, 2, (num_classes + num_distractors, 3, cell, cell), generator=bank) * 2.0 - 1.0
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (num,), generator=gen)
    ranks = torch.rand(num, cells, generator=gen).argsort(-1).argsort(-1)
    masks = ranks < evidence_cells
    distractor = num_classes + torch.randint(0, num_distractors, (num, cells), generator=gen)
    choice = torch.where(masks, labels.unsqueeze(1), distractor)
    grid = patterns[choice].view(num, EVIDENCE_GRID, EVIDENCE_GRID, 3, cell, cell)
    images = grid.permute(0, 3, 1, 4, 2, 5).reshape(num, 3, img_size, img_size)
    images = images + noise * torch.randn(images.shape, generator=gen)
    return EvidenceDataset(images, labels, masks.view(num, EVIDENCE_GRID, EVIDENCE_GRID))


def evidence(img_size: int = 32, *, num_train: int = 2000, num_test: int = 500, seed: int = 0) -> DataBundle:
    """The evidence dataset (4 classes): train and test drawn with different seeds, same patterns."""
    train = make_evidence(num_train, img_size=img_size, seed=2 * seed + 1)
    test = make_evidence(num_test, img_size=img_size, seed=2 * seed + 2)
    return DataBundle(
        name="evidence",
        train=train,
        test=test,
        num_classes=4,
        in_chans=3,
        img_size=img_size,
        classes=[f"pattern{i}" for i in range(4)],
        preprocessing=Preprocessing(color="RGB", mean=(0.5,) * 3, std=(0.5,) * 3),  # ±1 patterns
    )
