"""One split of a dataset as a model is explained on it: the deterministic test view of every image,
in a fixed order, with a name per image and ground-truth masks where the data has them.

``explain_split("imagefolder:photos", split="train", prep=..., size=(224, 224), limit=1000)``
loads the dataset as :func:`~shapkern.data.load_dataset` does, then gives every image of the split,
training split included, the test view of ``prep`` (no random crops or flips), so an image means
the same input in every run and in every process. The built-in sets (``digits``, ``evidence``) are
tensors made with their own normalisation; ``prep`` does not change them.
"""

from __future__ import annotations

import os
from collections.abc import Sized
from dataclasses import dataclass
from functools import partial
from typing import cast

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from shapkern.data.catalog import DEFAULT_DATA_ROOT
from shapkern.data.datasets import EvidenceDataset, IndexedDataset
from shapkern.data.folders import ImageFiles
from shapkern.data.preprocess import Preprocessing, preprocess_image

__all__ = ["SPLITS", "SplitView", "explain_split"]

SPLITS = ("train", "test")


@dataclass
class SplitView:
    """The images of one split, in order; items are ``(image (C, H, W) float32, label, index)``.

    Attributes:
        dataset: the items (the first ``limit`` of the split).
        name: the dataset spec. split: ``"train"`` or ``"test"``.
        classes: class names.
        sources: one name per item: the file path relative to the folder for image files, else
            ``"<name>:<split>[<index>]"``.
    """

    dataset: Dataset
    name: str
    split: str
    classes: list[str]
    sources: list[str]
    _with_masks: EvidenceDataset | None = None

    def __len__(self) -> int:
        return _size(self.dataset)

    def masks(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """Ground-truth patch labels bool (n, N) on a model's patch grid (a patch counts when half
        its area is evidence), or None when the data has no masks."""
        if self._with_masks is None:
            return None
        return self._with_masks.patch_masks(grid)[: len(self)] >= 0.5


def _size(dataset: Dataset) -> int:
    return len(cast(Sized, dataset))  # torch's Dataset declares no __len__


def _set_view(dataset: Dataset, view) -> None:
    """Give the image files or torchvision datasets under the wrappers the transform ``view``
    (the built-in sets are tensors: no transform)."""
    from torchvision.datasets import VisionDataset

    if isinstance(dataset, IndexedDataset | Subset):
        _set_view(dataset.dataset, view)
    elif isinstance(dataset, ConcatDataset):
        for part in dataset.datasets:
            _set_view(part, view)
    elif isinstance(dataset, ImageFiles | VisionDataset):
        dataset.transform = view


def _sources(dataset: Dataset, prefix: str, root: str | None) -> list[str]:
    """The name of every item (see :class:`SplitView`)."""
    if isinstance(dataset, IndexedDataset):
        return _sources(dataset.dataset, prefix, root)
    if isinstance(dataset, Subset):
        inner = _sources(dataset.dataset, prefix, root)
        return [inner[i] for i in dataset.indices]
    if isinstance(dataset, ImageFiles):
        return [os.path.relpath(path, root) if root else path for path, _ in dataset.samples]
    return [f"{prefix}[{i}]" for i in range(_size(dataset))]


def explain_split(
    spec: str,
    *,
    split: str = "test",
    prep: Preprocessing | None,
    size: tuple[int, int],
    limit: int | None = None,
    root: str = DEFAULT_DATA_ROOT,
    download: bool = False,
    seed: int = 0,
) -> SplitView:
    """The ``split`` of dataset ``spec`` (see :data:`~shapkern.data.DATASETS`) in the test view of
    ``prep`` (None: the dataset's own) at the model's input ``size`` (H, W), its first ``limit``
    images (all when None).

    Raises ValueError for an unknown dataset or split, a limit below 1, or a non-square size.
    """
    from shapkern.data import load_dataset  # the package's entry point (this module is imported by it)

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of images or None, got {limit!r}")
    if size[0] != size[1]:
        raise ValueError(f"the datasets make square images; the model takes {size[1]}x{size[0]}")
    bundle = load_dataset(
        spec,
        img_size=size[0],
        patch_size=1,
        seed=seed,
        root=root,
        download=download,
        mean=None if prep is None else prep.mean,
        std=None if prep is None else prep.std,
    )
    items = bundle.train if split == "train" else bundle.test
    prep = bundle.preprocessing if prep is None else prep
    _set_view(items, partial(preprocess_image, prep=prep, size=(size[0], size[1]), resize=True))
    folder = spec[len("imagefolder:") :] if spec.startswith("imagefolder:") else None
    sources = _sources(items, f"{bundle.name}:{split}", folder)
    count = _size(items) if limit is None else min(limit, _size(items))
    return SplitView(
        dataset=Subset(items, range(count)) if count < _size(items) else items,
        name=bundle.name,
        split=split,
        classes=list(bundle.classes),
        sources=sources[:count],
        _with_masks=items if isinstance(items, EvidenceDataset) else None,
    )
