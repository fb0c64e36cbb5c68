"""The user's own images in class folders (torchvision ImageFolder layout), checked when loaded.

``PATH/<class>/<image>``, with ``PATH/train`` and ``PATH/val`` (or ``PATH/test``) when present,
else a seeded 90/10 split. Every file is opened once when the dataset is built: an unreadable
image is an error naming it, or, with ``skip_bad_images``, left out with a count in the log.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch.utils.data import Subset

from shapkern.data.datasets import DataBundle, IndexedDataset
from shapkern.data.preprocess import Preprocessing

__all__ = ["imagefolder"]

CROP_PCT = 0.875  # timm's evaluation transform: resize to size / 0.875, centre crop
SHOWN_BAD_FILES = 5


def _readable(path: str) -> str | None:
    """None if PIL can decode the file, else the reason it cannot."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(
            path
        ) as image:  # verify() leaves the image unusable; a real decode catches truncation
            image.load()
    except Exception as exc:  # PIL raises many types for bad files
        return f"{type(exc).__name__}: {exc}"
    return None


def _checked_folder(root: str, transform, skip_bad_images: bool):
    """An ImageFolder of ``root`` without unreadable files (or an error naming them)."""
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(root, transform=transform)
    bad = [(path, why) for path, _ in folder.samples if (why := _readable(path)) is not None]
    if bad and not skip_bad_images:
        shown = "; ".join(f"{path} ({why})" for path, why in bad[:SHOWN_BAD_FILES])
        raise ValueError(
            f"imagefolder: {len(bad)} of {len(folder.samples)} files in {root} cannot be read as images: "
            f"{shown}{' ...' if len(bad) > SHOWN_BAD_FILES else ''}. "
            "Remove them, or skip them with --skip-bad-images"
        )
    if bad:
        dropped = {path for path, _ in bad}
        folder.samples = [s for s in folder.samples if s[0] not in dropped]
        folder.imgs = folder.samples
        folder.targets = [target for _, target in folder.samples]
        print(f"imagefolder: skipped {len(bad)} unreadable file(s) in {root}", flush=True)
    return folder


def imagefolder(
    path: str,
    img_size: int = 224,
    *,
    seed: int = 0,
    skip_bad_images: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> DataBundle:
    """The user's images with timm's train/eval transforms (random resized crop, flip; resize, centre
    crop), normalised with (mean, std): the backbone's, as the trainer passes them; ImageNet's when
    None.

    Raises ValueError for a missing folder, unreadable images (unless ``skip_bad_images``), fewer
    than two classes, or a test split whose classes differ from the training split's.
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

    if not os.path.isdir(path):
        raise ValueError(f"imagefolder: {path!r} is not a directory")
    mean = tuple(IMAGENET_DEFAULT_MEAN if mean is None else mean)
    std = tuple(IMAGENET_DEFAULT_STD if std is None else std)
    train_tf = create_transform(input_size=img_size, is_training=True, mean=mean, std=std)
    test_tf = create_transform(input_size=img_size, is_training=False, crop_pct=CROP_PCT, mean=mean, std=std)
    test_dir = next(
        (os.path.join(path, d) for d in ("val", "test") if os.path.isdir(os.path.join(path, d))), None
    )
    if os.path.isdir(os.path.join(path, "train")) and test_dir is not None:
        train = _checked_folder(os.path.join(path, "train"), train_tf, skip_bad_images)
        test = _checked_folder(test_dir, test_tf, skip_bad_images)
        if test.classes != train.classes:
            raise ValueError(f"imagefolder: {test_dir} has classes {test.classes}, train has {train.classes}")
        classes = train.classes
    else:
        full_train = _checked_folder(path, train_tf, skip_bad_images)
        full_test = _checked_folder(path, test_tf, skip_bad_images=True)  # same files, already checked
        order = torch.randperm(len(full_train), generator=torch.Generator().manual_seed(seed)).tolist()
        cut = max(1, len(order) // 10)
        train, test = Subset(full_train, order[cut:]), Subset(full_test, order[:cut])
        classes = full_train.classes
    if len(classes) < 2:
        raise ValueError(
            f"imagefolder: {path} has {len(classes)} class folder(s); classification needs at least 2"
        )
    return DataBundle(
        name=f"imagefolder:{path}",
        train=IndexedDataset(train),
        test=IndexedDataset(test),
        num_classes=len(classes),
        in_chans=3,
        img_size=img_size,
        classes=list(classes),
        preprocessing=Preprocessing(color="RGB", mean=mean, std=std, crop_pct=CROP_PCT),
    )
