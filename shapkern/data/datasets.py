"""Dataset containers shared by every data source."""

from __future__ import annotations

from collections.abc import Sized
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from shapkern.data.preprocess import Preprocessing

__all__ = ["DataBundle", "EvidenceDataset", "IndexedDataset", "TensorImageDataset"]


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
        return len(cast(Sized, self.dataset))  # torch's Dataset declares no __len__; these have one

    def __getitem__(self, index: int):
        image, label = self.dataset[index][:2]
        return image, int(label), index


@dataclass
class DataBundle:
    """Train and test splits with what a model needs to know about them.

    Every item of ``train`` and ``test`` is ``(image (C, H, W) float32, label int, index int)``; the
    index seeds that sample's coalitions in training, so they do not depend on the batch or the
    number of processes.
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    img_size: int
    classes: list[str]
    preprocessing: Preprocessing  # how image files become inputs like this data's

    def describe(self) -> dict:
        """What a checkpoint records about the data: name, classes and preprocessing."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "img_size": self.img_size,
            "classes": list(self.classes),
            "preprocessing": self.preprocessing.to_dict(),
        }
