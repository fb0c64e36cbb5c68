"""The user's own images in class folders (torchvision ImageFolder layout), checked when loaded.

``PATH/<class>/<image>``, with ``PATH/train`` and ``PATH/val`` (or ``PATH/test``) when present,
else a seeded 90/10 split. Every file is opened once when the dataset is built: an unreadable
image (or one over PIL's decompression-bomb pixel limit) is an error naming it, or, with
``skip_bad_images``, left out with a count in the log.

Symbolic links: class folders, and folders and files in them, may be links. Every image file is
one item however many routes lead to it (files are told apart by their real path), in the class
folder it really lives in: a link to a folder or file of another class folder (or of the other
split) adds nothing, nor does a link back up the tree (a loop). A link to a folder or file outside
the class folders is followed, and its images belong to the class folder holding the link; such a
file reached from two class folders is an error naming both links.

Files are decoded by :func:`~shapkern.data.preprocess.open_image` and
:func:`~shapkern.data.preprocess.decode_image`, as ``shapkern explain`` decodes them (16-bit PNGs
by their depth); the test view is :func:`~shapkern.data.preprocess.preprocess_image` itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from shapkern.data.datasets import DataBundle, IndexedDataset
from shapkern.data.preprocess import (
    TEST_CROP_PCT,
    PixelLimitError,
    Preprocessing,
    decode_image,
    open_image,
    preprocess_image,
)

__all__ = ["ImageFiles", "imagefolder"]

SHOWN_BAD_FILES = 5


class ImageFiles(Dataset):
    """Image files and their labels; items are ``(transform(open_image(path)), label)``.

    Attributes:
        samples: (path, label) per item, as torchvision's ImageFolder has them.
    """

    def __init__(self, samples: list[tuple[str, int]], transform: Callable):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return self.transform(open_image(path)), label


def _class_names(folder: str) -> list[str]:
    """The class folders in ``folder``, sorted (as torchvision's ImageFolder finds them)."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def _inside(path: str, folder: str) -> bool:
    """Whether real path ``path`` is ``folder`` or lies under it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _owner(real: str, homes: set[str]) -> str | None:
    """The class folder (of ``homes``, real paths) that real path ``real`` lies in, or None."""
    while real not in homes:
        parent = os.path.dirname(real)
        if parent == real:
            return None
        real = parent
    return real


def _class_files(class_dir: str, home: str, homes: set[str], extensions: tuple[str, ...]):
    """(path, real path) of the image files under ``class_dir`` (real path ``home``) that belong to
    it, each real file once, in torchvision's order; and how many entries were passed over: links
    into another class folder (of ``homes``) or back up the tree, and second names of a file.

    Only symbolic links need their real path resolved: below a folder of known real path, a plain
    entry's is the folder's joined with its name."""
    found, skipped, visited, stack = [], 0, {home}, [(class_dir, home)]
    while stack:
        folder, folder_real = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                link = entry.is_symlink()
                real = os.path.realpath(entry.path) if link else os.path.join(folder_real, entry.name)
                foreign = link and _owner(real, homes) not in (None, home)  # lives in another class folder
                if entry.is_dir():
                    loop = link and any(_inside(h, real) for h in homes)  # holds a class folder: up the tree
                    if foreign or loop or real in homes or real in visited:
                        skipped += 1
                        continue
                    visited.add(real)
                    stack.append((entry.path, real))
                elif entry.is_file() and entry.name.lower().endswith(extensions):
                    if foreign:
                        skipped += 1  # listed in the class folder it lives in
                        continue
                    found.append((entry.path, real))
    found.sort(key=lambda item: (os.path.dirname(item[0]), os.path.basename(item[0])))
    unique: dict[str, str] = {}
    for path, real in found:
        skipped += real in unique
        unique.setdefault(real, path)
    return [(path, real) for real, path in unique.items()], skipped


def _list_images(root: str, splits: list[str], classes: list[str]) -> list[list[tuple[str, int]]]:
    """Each split's (path, label) samples: ``splits`` are folders holding the ``classes`` folders;
    every real file is listed once over all of them (see the module)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    folders = [
        (s, label, os.path.join(split, name))
        for s, split in enumerate(splits)
        for label, name in enumerate(classes)
    ]
    homes = [os.path.realpath(folder) for _, _, folder in folders]
    if len(set(homes)) < len(homes):
        same = [folder for (_, _, folder), home in zip(folders, homes, strict=True) if homes.count(home) > 1]
        raise ValueError(f"imagefolder: the class folders {', '.join(same)} are one folder (symbolic links)")
    samples: list[list[tuple[str, int]]] = [[] for _ in splits]
    claimed: dict[str, str] = {}
    skipped = 0
    for (s, label, folder), home in zip(folders, homes, strict=True):
        files, skips = _class_files(folder, home, set(homes), IMG_EXTENSIONS)
        if not files:
            raise ValueError(
                f"imagefolder: class folder {folder} holds no image files ({', '.join(IMG_EXTENSIONS)})"
            )
        for path, real in files:
            if real in claimed:
                raise ValueError(
                    f"imagefolder: {real} is linked from {claimed[real]} and {path}: an image can have "
                    "one class and split only; remove one of the links"
                )
            claimed[real] = path
            samples[s].append((path, label))
        skipped += skips
    if skipped:
        print(
            f"imagefolder: {skipped} symbolic link(s) in {root} lead back up the tree or to images read "
            "elsewhere: not followed (every image is read once)",
            flush=True,
        )
    return samples


def _unreadable(path: str) -> str | None:
    """None if the file decodes as an image, else what is wrong, naming it."""
    from PIL import Image

    try:
        open_image(path)  # a full decode catches truncation
        with Image.open(path) as image:  # verify() checks what a decode skips (PNG checksums)
            image.verify()
    except PixelLimitError as exc:  # names the file
        return str(exc)
    except Exception as exc:  # PIL raises many types for bad files
        return f"{path} ({type(exc).__name__}: {exc})"
    return None


def _readable_only(root: str, samples: list[tuple[str, int]], skip_bad_images: bool):
    """``samples`` without unreadable files (or an error naming them)."""
    why = {path: reason for path, _ in samples if (reason := _unreadable(path)) is not None}
    bad = list(why.values())
    if bad and not skip_bad_images:
        raise ValueError(
            f"imagefolder: {len(bad)} of {len(samples)} files in {root} cannot be read as images: "
            f"{'; '.join(bad[:SHOWN_BAD_FILES])}{' ...' if len(bad) > SHOWN_BAD_FILES else ''}. "
            "Remove them, or skip them with --skip-bad-images"
        )
    if bad:
        print(f"imagefolder: skipped {len(bad)} unreadable file(s) in {root}", flush=True)
        return [s for s in samples if s[0] not in why]
    return samples


def imagefolder(
    path: str,
    img_size: int = 224,
    *,
    seed: int = 0,
    skip_bad_images: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> DataBundle:
    """The user's images: training takes timm's random resized crop and flip (no colour jitter), the
    test view is timm's eval transform (resize, centre crop), both normalised with (mean, std): the
    backbone's, as the trainer passes them; ImageNet's when None.

    Raises ValueError for a missing folder, unreadable images (unless ``skip_bad_images``), fewer
    than two classes, an empty class folder, a file linked from two class folders, or a test split
    whose classes differ from the training split's.
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
    from torchvision import transforms as T

    if not os.path.isdir(path):
        raise ValueError(f"imagefolder: {path!r} is not a directory")
    mean = tuple(IMAGENET_DEFAULT_MEAN if mean is None else mean)
    std = tuple(IMAGENET_DEFAULT_STD if std is None else std)
    prep = Preprocessing(color="RGB", mean=mean, std=std, crop_pct=TEST_CROP_PCT)
    # Decoded as explain decodes (16 bits kept), then timm's crop and flip act on the [0, 1] tensor.
    no_jitter: Any = None  # timm takes None for no colour jitter, though its type hint leaves None out
    crop_flip = create_transform(
        input_size=img_size, is_training=True, color_jitter=no_jitter, mean=mean, std=std
    )
    train_tf = T.Compose([partial(decode_image, color=prep.color), crop_flip])
    test_tf = partial(preprocess_image, prep=prep, size=(img_size, img_size))
    test_dir = next(
        (os.path.join(path, d) for d in ("val", "test") if os.path.isdir(os.path.join(path, d))), None
    )
    split_layout = os.path.isdir(os.path.join(path, "train")) and test_dir is not None
    splits = [os.path.join(path, "train"), test_dir] if test_dir is not None and split_layout else [path]
    classes = _class_names(splits[0])
    if len(classes) < 2:
        raise ValueError(
            f"imagefolder: {path} has {len(classes)} class folder(s); classification needs at least 2"
        )
    if test_dir is not None and split_layout:
        if (test_classes := _class_names(test_dir)) != classes:
            raise ValueError(f"imagefolder: {test_dir} has classes {test_classes}, train has {classes}")
        train_samples, test_samples = _list_images(path, splits, classes)
        train: Dataset = ImageFiles(_readable_only(splits[0], train_samples, skip_bad_images), train_tf)
        test: Dataset = ImageFiles(_readable_only(test_dir, test_samples, skip_bad_images), test_tf)
    else:
        (samples,) = _list_images(path, splits, classes)
        samples = _readable_only(path, samples, skip_bad_images)
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
        cut = max(1, len(order) // 10)
        train = Subset(ImageFiles(samples, train_tf), order[cut:])
        test = Subset(ImageFiles(samples, test_tf), order[:cut])
    return DataBundle(
        name=f"imagefolder:{path}",
        train=IndexedDataset(train),
        test=IndexedDataset(test),
        num_classes=len(classes),
        in_chans=3,
        img_size=img_size,
        classes=list(classes),
        preprocessing=prep,
    )
