"""Where ``shapkern explain``'s pictures come from: image files or a dataset's test split,
preprocessed as the checkpoint's training data was or as a named model's weights expect."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from shapkern.data import PixelLimitError, Preprocessing, explain_split, open_image, preprocess_image
from shapkern.explainers import NamedModel
from shapkern.explainers import load_model as load_named_model

__all__ = ["Inputs", "builtin_images", "load_images", "load_model", "read_inputs"]


def load_model(path: str, device: torch.device) -> tuple[nn.Module, dict]:
    """A trained ShapleyViT and the checkpoint's data record (name, classes, preprocessing)."""
    named = load_named_model(checkpoint=path, device=device)
    return named.model, cast(dict, named.data)  # a checkpoint always has it (load_model checks)


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


def builtin_images(data: dict, arch: dict, name: str, count: int, grid: tuple[int, int], **location):
    """The first ``count`` test images of a dataset in the test view of the model's record ``data``
    (its training data's name and preprocessing): images, labels, patch masks (B, N) or None, class
    names (None when the set is not the one the model was trained on). ``location``: the data root
    and whether to download (see :func:`~shapkern.data.explain_split`)."""
    if count < 1:
        raise ValueError(f"--num-images must be positive, got {count}")
    prep = Preprocessing.from_dict(data["preprocessing"])  # as trained; the built-in sets have their own
    size = (arch["img_size"], arch["img_size"])
    view = explain_split(name, prep=prep, size=size, limit=count, **location)
    if name != data["name"]:
        print(f"note: the checkpoint was trained on {data['name']!r}, explaining {name!r} images")
    items = [view.dataset[i] for i in range(len(view))]
    images = torch.stack([item[0] for item in items])
    labels = [int(item[1]) for item in items]
    return images, labels, view.masks(grid), view.classes if name == data["name"] else None


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


def read_inputs(args: argparse.Namespace, named: NamedModel, grid: tuple[int, int]) -> Inputs:
    """The images of ``--data`` or ``--images``, preprocessed as the checkpoint was trained or as
    the named model's weights expect."""
    prep = cast(Preprocessing, named.preprocessing)  # load_model gives every model its own
    if args.data:
        record = named.data or {"name": args.data, "preprocessing": prep.to_dict()}
        arch = {"img_size": named.input_size[0]}
        location = {"root": args.data_root, "download": args.download}
        images, labels, masks, classes = builtin_images(
            record, arch, args.data, args.num_images, grid, **location
        )
        sources = [f"{args.data}:test[{i}]" for i in range(images.shape[0])]
        return Inputs(images, list(labels), masks, sources, classes)
    images = load_images(args.images, prep, named.input_size, resize=args.resize)
    return Inputs(images, [None] * images.shape[0], None, list(args.images), named.classes)
