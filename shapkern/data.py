"""Datasets for training self-explaining ViTs, none of which downloads anything.

- ``digits``: scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes), upsampled
  to ``img_size`` (32 by default: with 8×8 patches, 16 players, so exact Shapley values take
  2^16 coalitions).
- ``evidence``: a procedurally generated, seeded dataset on a 4×4 grid of cells. A few cells hold
  the pattern of the image's class, the others hold distractor patterns; every image comes with
  its ground-truth evidence mask, so localisation can be scored.
- ``imagefolder:PATH``: the user's images (torchvision ImageFolder) with timm's transforms;
  ``PATH/train`` and ``PATH/val`` (or ``PATH/test``) when present, else a seeded 90/10 split.

Every dataset item is ``(image (C, H, W) float32, label int, index int)``; the index seeds the
coalitions of that sample (shapkern.train), so they do not depend on the number of processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = [
    "DATASETS",
    "DataBundle",
    "EvidenceDataset",
    "IndexedDataset",
    "TensorImageDataset",
    "load_dataset",
]

DATASETS = ("digits", "evidence", "imagefolder:PATH")
EVIDENCE_GRID = 4


class TensorImageDataset(Dataset):
    """Images (n, C, H, W) and labels (n,) held in memory; items are (image, label, index)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index]), index


class EvidenceDataset(TensorImageDataset):
    """A TensorImageDataset with ground-truth evidence masks (n, 4, 4) bool on the cell grid."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor):
        super().__init__(images, labels)
        self.masks = masks

    def patch_masks(self, grid: tuple[int, int]) -> torch.Tensor:
        """The evidence masks on a model's patch grid: (n, gh * gw) float, the fraction of each
        patch's area covered by evidence cells."""
        cells = self.masks.float().unsqueeze(1)
        return F.adaptive_avg_pool2d(
            F.interpolate(cells, scale_factor=grid[0], mode="nearest"), grid
        ).flatten(1)


class IndexedDataset(Dataset):
    """Wraps a dataset of (image, label) into one of (image, label, index)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index][:2]
        return image, int(label), index


@dataclass
class DataBundle:
    """Train and test splits with what a model needs to know about them."""

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    img_size: int
    classes: list[str]
    normalisation: tuple[float, float] | None = None  # (mean, std) the images were standardised with


def _check_sizes(img_size: int, patch_size: int) -> None:
    if img_size < 1 or patch_size < 1:
        raise ValueError(f"img_size and patch_size must be positive, got {img_size} and {patch_size}")
    if img_size % patch_size:
        raise ValueError(
            f"patch size {patch_size} does not divide the image size {img_size}: the patches must tile "
            f"the image (e.g. --img-size 32 --patch-size 8 gives a 4x4 grid of 16 patches)"
        )


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
    train, test, normalisation = _normalise(images[train_idx], images[test_idx])
    return DataBundle(
        name="digits",
        train=TensorImageDataset(train.expand(-1, 3, -1, -1).contiguous(), labels[train_idx]),
        test=TensorImageDataset(test.expand(-1, 3, -1, -1).contiguous(), labels[test_idx]),
        num_classes=10,
        in_chans=3,
        img_size=img_size,
        classes=[str(i) for i in range(10)],
        normalisation=normalisation,
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
    )


def imagefolder(path: str, img_size: int = 224, *, seed: int = 0) -> DataBundle:
    """The user's images with timm's train/eval transforms (random resized crop, flip; resize, centre crop)."""
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    if not os.path.isdir(path):
        raise ValueError(f"imagefolder: {path!r} is not a directory")
    train_tf = create_transform(input_size=img_size, is_training=True)
    test_tf = create_transform(input_size=img_size, is_training=False)
    test_dir = next(
        (os.path.join(path, d) for d in ("val", "test") if os.path.isdir(os.path.join(path, d))), None
    )
    if os.path.isdir(os.path.join(path, "train")) and test_dir is not None:
        train = ImageFolder(os.path.join(path, "train"), transform=train_tf)
        test = ImageFolder(test_dir, transform=test_tf)
        if test.classes != train.classes:
            raise ValueError(f"imagefolder: {test_dir} has classes {test.classes}, train has {train.classes}")
    else:
        full_train, full_test = ImageFolder(path, transform=train_tf), ImageFolder(path, transform=test_tf)
        order = torch.randperm(len(full_train), generator=torch.Generator().manual_seed(seed)).tolist()
        cut = max(1, len(order) // 10)
        train = torch.utils.data.Subset(full_train, order[cut:])
        test = torch.utils.data.Subset(full_test, order[:cut])
        train.classes = full_train.classes
    return DataBundle(
        name=f"imagefolder:{path}",
        train=IndexedDataset(train),
        test=IndexedDataset(test),
        num_classes=len(train.classes),
        in_chans=3,
        img_size=img_size,
        classes=list(train.classes),
    )


def load_dataset(spec: str, *, img_size: int = 32, patch_size: int = 8, seed: int = 0) -> DataBundle:
    """``"digits"``, ``"evidence"`` or ``"imagefolder:PATH"`` -> DataBundle.

    Raises ValueError for an unknown dataset or a patch size that does not divide the image.
    """
    _check_sizes(img_size, patch_size)
    if spec == "digits":
        return digits(img_size, seed=seed)
    if spec == "evidence":
        if (img_size // EVIDENCE_GRID) % patch_size and patch_size % (img_size // EVIDENCE_GRID):
            raise ValueError(
                f"evidence: patch size {patch_size} neither divides nor is a multiple of the evidence cell "
                f"size {img_size // EVIDENCE_GRID}"
            )
        return evidence(img_size, seed=seed)
    if spec.startswith("imagefolder:") and len(spec) > len("imagefolder:"):
        return imagefolder(spec[len("imagefolder:") :], img_size, seed=seed)
    raise ValueError(f"unknown dataset {spec!r}; choose one of {', '.join(DATASETS)}")
