"""Where ``shapkern explain``'s images come from: image files or a built-in set's test split,
preprocessed as the checkpoint's training data was, with the checkpoint's model."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sized
from dataclasses import dataclass
from typing import cast

import torch

from shapkern.checkpoint import load_checkpoint
from shapkern.data import (
    EvidenceDataset,
    PixelLimitError,
    Preprocessing,
    load_dataset,
    open_image,
    preprocess_image,
)
from shapkern.models import ShapleyViT

__all__ = ["BUILTIN", "Inputs", "builtin_images", "load_images", "load_model", "read_inputs"]

BUILTIN = ("digits", "evidence")


def load_model(path: str, device: torch.device) -> tuple[ShapleyViT, dict]:
    """A trained ShapleyViT and the checkpoint's data record (name, classes, preprocessing)."""
    state = load_checkpoint(path)
    model = ShapleyViT.from_state(state, path).to(device)
    data = state.get("data")
    if not isinstance(data, dict) or "preprocessing" not in data:
        raise ValueError(
            f"{path} records no data preprocessing; it was not written by this version of `shapkern train`"
        )
    Preprocessing.from_dict(data["preprocessing"], source=path)  # a record this version can follow
    return model, data


def load_images(
    files: list[str], prep: Preprocessing, size: tuple[int, int], *, resize: bool
) -> torch.Tensor:
    """Image files -> (B, C, H, W), preprocessed like the training data; wrong sizes need ``resize``."""
    from PIL import UnidentifiedImageError

    out = []
    for file in files:
        if not os.path.isfile(file):
            raise ValueError(f"image file not found: {file}")
        try:
            image = open_image(file)  # as imagefolder reads its files
        except PixelLimitError:
            raise  # names the file and says what to do
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ValueError(f"cannot read {file} as an image (PNG, JPEG, ...): {exc}") from exc
        try:
            out.append(preprocess_image(image, prep, size, resize=resize))
        except ValueError as exc:
            raise ValueError(f"{file}: {exc}") from None
    return torch.stack(out)


def builtin_images(data: dict, arch: dict, name: str, count: int, grid: tuple[int, int]):
    """The first ``count`` test images of a built-in set: images, labels, patch masks (B, N) or None,
    class names (None when the set is not the one the model was trained on)."""
    if count < 1:
        raise ValueError(f"--num-images must be positive, got {count}")
    prep = Preprocessing.from_dict(data["preprocessing"])  # as trained; the built-in sets have their own
    bundle = load_dataset(
        name, img_size=arch["img_size"], patch_size=arch["patch_size"], mean=prep.mean, std=prep.std
    )
    if name != data["name"]:
        print(f"note: the checkpoint was trained on {data['name']!r}, explaining {name!r} images")
    test = bundle.test
    count = min(count, len(cast(Sized, test)))  # torch's Dataset declares no __len__
    images = torch.stack([test[i][0] for i in range(count)])
    labels = [int(test[i][1]) for i in range(count)]
    masks = test.patch_masks(grid)[:count] >= 0.5 if isinstance(test, EvidenceDataset) else None
    return images, labels, masks, bundle.classes if name == data["name"] else None


@dataclass
class Inputs:
    """The images to explain (B, C, H, W) and what is known of each: label, patch masks of the
    evidence (B, N) or None, where it came from, and the class names (None: unknown)."""

    images: torch.Tensor
    labels: list[int | None]
    masks: torch.Tensor | None
    sources: list[str]
    classes: list[str] | None

    def class_name(self, k: int) -> str:
        return self.classes[k] if self.classes and k < len(self.classes) else str(k)


def read_inputs(args: argparse.Namespace, model: ShapleyViT, data: dict, grid: tuple[int, int]) -> Inputs:
    """The images of ``--data`` or ``--images``, preprocessed as the checkpoint was trained."""
    if args.data:
        arch = cast(dict, model.arch)  # ShapleyViT.from_state always records it
        images, labels, masks, classes = builtin_images(data, arch, args.data, args.num_images, grid)
        sources = [f"{args.data}:test[{i}]" for i in range(images.shape[0])]
        return Inputs(images, list(labels), masks, sources, classes)
    prep = Preprocessing.from_dict(data["preprocessing"])
    size = tuple(model.backbone.patch_embed.img_size)
    images = load_images(args.images, prep, size, resize=args.resize)
    return Inputs(images, [None] * images.shape[0], None, list(args.images), data.get("classes"))
