"""Data for training and explaining: built-in sets, the user's image folders, and preprocessing.

``load_dataset(spec)`` takes ``"digits"``, ``"evidence"`` or ``"imagefolder:PATH"`` and returns a
:class:`DataBundle`: train and test splits of ``(image, label, index)`` items, the class names,
and the :class:`Preprocessing` that turns image files into inputs like these.
"""

from __future__ import annotations

from shapkern.data.datasets import DataBundle, EvidenceDataset, IndexedDataset, TensorImageDataset
from shapkern.data.folders import imagefolder
from shapkern.data.preprocess import Preprocessing, pixels_to_unit, preprocess_image
from shapkern.data.synthetic import EVIDENCE_GRID, digits, evidence, make_evidence

__all__ = [
    "DATASETS",
    "DataBundle",
    "EvidenceDataset",
    "IndexedDataset",
    "Preprocessing",
    "TensorImageDataset",
    "digits",
    "evidence",
    "imagefolder",
    "load_dataset",
    "make_evidence",
    "pixels_to_unit",
    "preprocess_image",
]

DATASETS = ("digits", "evidence", "imagefolder:PATH")


def _check_sizes(img_size: int, patch_size: int) -> None:
    if img_size < 1 or patch_size < 1:
        raise ValueError(f"img_size and patch_size must be positive, got {img_size} and {patch_size}")
    if img_size % patch_size:
        raise ValueError(
            f"patch size {patch_size} does not divide the image size {img_size}: the patches must tile "
            f"the image (e.g. --img-size 32 --patch-size 8 gives a 4x4 grid of 16 patches)"
        )


def load_dataset(
    spec: str, *, img_size: int = 32, patch_size: int = 8, seed: int = 0, skip_bad_images: bool = False
) -> DataBundle:
    """``"digits"``, ``"evidence"`` or ``"imagefolder:PATH"`` -> DataBundle.

    Raises ValueError for an unknown dataset or a patch size that does not divide the image.
    """
    _check_sizes(img_size, patch_size)
    if spec == "digits":
        return digits(img_size, seed=seed)
    if spec == "evidence":
        cell = img_size // EVIDENCE_GRID
        if cell % patch_size and patch_size % cell:
            raise ValueError(
                f"evidence: patch size {patch_size} neither divides nor is a multiple of the evidence "
                f"cell size {cell}"
            )
        return evidence(img_size, seed=seed)
    if spec.startswith("imagefolder:") and len(spec) > len("imagefolder:"):
        return imagefolder(spec[len("imagefolder:") :], img_size, seed=seed, skip_bad_images=skip_bad_images)
    raise ValueError(f"unknown dataset {spec!r}; choose one of {', '.join(DATASETS)}")
