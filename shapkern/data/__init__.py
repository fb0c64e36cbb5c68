"""Data for training and explaining: built-in sets, the user's image folders, and preprocessing.

``load_dataset(spec)`` takes ``"digits"``, ``"evidence"``, a standard dataset by name (``"cifar10"``,
``"cifar100"``, ``"pets"``, ``"flowers102"``, ``"stl10"``, ``"imagenette"``: torchvision reads them
under a data root, see :mod:`shapkern.data.catalog`) or ``"imagefolder:PATH"`` and returns a
:class:`DataBundle`: train and test splits of ``(image, label, index)`` items, the class names,
and the :class:`Preprocessing` that turns image files into inputs like these. ``explain_split``
gives one split in a model's deterministic test view, for explaining it (:mod:`shapkern.data.views`).

``load_caption_dataset(spec)`` takes ``"captions"`` (built in, with the masks of what each caption
names), ``"coco-captions"`` or ``"flickr30k"`` (local files) and returns a :class:`CaptionBundle`
of ``(image, caption tokens, index)`` items, one per caption, for image-text matching.
"""

from __future__ import annotations

from collections.abc import Sequence

from shapkern.data.caption_sets import CAPTION_DATASETS, LazyImages, load_caption_dataset
from shapkern.data.captions import CaptionBundle, CaptionedImages, captions, make_captions
from shapkern.data.catalog import CATALOG, DEFAULT_DATA_ROOT, catalog_dataset
from shapkern.data.datasets import DataBundle, EvidenceDataset, IndexedDataset, TensorImageDataset
from shapkern.data.folders import imagefolder
from shapkern.data.preprocess import (
    PixelLimitError,
    Preprocessing,
    decode_image,
    open_image,
    pixels_to_unit,
    preprocess_image,
)
from shapkern.data.synthetic import digits, evidence, make_evidence
from shapkern.data.views import SPLITS, SplitView, explain_split

__all__ = [
    "CAPTION_DATASETS",
    "CATALOG",
    "DATASETS",
    "DEFAULT_DATA_ROOT",
    "CaptionBundle",
    "CaptionedImages",
    "DataBundle",
    "EvidenceDataset",
    "IndexedDataset",
    "SPLITS",
    "LazyImages",
    "PixelLimitError",
    "Preprocessing",
    "SplitView",
    "TensorImageDataset",
    "captions",
    "catalog_dataset",
    "decode_image",
    "digits",
    "evidence",
    "explain_split",
    "imagefolder",
    "load_caption_dataset",
    "load_dataset",
    "make_captions",
    "make_evidence",
    "open_image",
    "pixels_to_unit",
    "preprocess_image",
]

DATASETS = ("digits", "evidence", *CATALOG, "imagefolder:PATH")


def _check_sizes(img_size: int, patch_size: int) -> None:
    if img_size < 1 or patch_size < 1:
        raise ValueError(f"img_size and patch_size must be positive, got {img_size} and {patch_size}")
    if img_size % patch_size:
        raise ValueError(
            f"patch size {patch_size} does not divide the image size {img_size}: the patches must tile "
            f"the image (e.g. --img-size 32 --patch-size 8 gives a 4x4 grid of 16 patches)"
        )


def load_dataset(
    spec: str,
    *,
    img_size: int = 32,
    patch_size: int = 8,
    seed: int = 0,
    skip_bad_images: bool = False,
    root: str = DEFAULT_DATA_ROOT,
    download: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> DataBundle:
    """A dataset of :data:`DATASETS` -> DataBundle.

    Args:
        spec: ``"digits"``, ``"evidence"``, a :data:`CATALOG` name or ``"imagefolder:PATH"``.
        img_size, patch_size: the model's input and patch size (the patches must tile the image).
        seed: the built-in sets' split and images; imagefolder's split without train/val folders.
        skip_bad_images: imagefolder: leave unreadable files out instead of failing.
        root, download: where the catalog datasets live, and whether to fetch a missing one.
        mean, std: the normalisation of the catalog datasets and imagefolder (default ImageNet's);
            the built-in sets have their own.

    Raises ValueError for an unknown dataset, a catalog dataset not found, or a patch size that
    does not divide the image.
    """
    _check_sizes(img_size, patch_size)
    if spec == "digits":
        return digits(img_size, seed=seed)
    if spec == "evidence":  # patches need not align with its cells: patch_masks gives coverage fractions
        return evidence(img_size, seed=seed)
    if spec in CATALOG:
        return catalog_dataset(spec, img_size, root=root, download=download, mean=mean, std=std)
    if spec.startswith("imagefolder:") and len(spec) > len("imagefolder:"):
        path = spec[len("imagefolder:") :]
        return imagefolder(path, img_size, seed=seed, skip_bad_images=skip_bad_images, mean=mean, std=std)
    raise ValueError(f"unknown dataset {spec!r}; choose one of {', '.join(DATASETS)}")
