"""Captioned datasets by name: the built-in ``captions``, and COCO Captions and Flickr30k read from
local files under a data root (nothing is downloaded: both need a registration or a request).

- ``captions``: built in (:mod:`shapkern.data.captions`): 2,000 / 500 images, 4-5 captions each.
- ``coco-captions``: ``coco/train2017/`` and ``coco/val2017/`` with
  ``coco/annotations/captions_{train,val}2017.json``; train2017 / val2017.
- ``flickr30k``: ``flickr30k/flickr30k-images/`` with ``flickr30k/results_20130124.token``, read by
  torchvision's Flickr30k; the last 1,000 images by file name are the test split.

COCO's annotation files are read with ``json`` (torchvision's CocoCaptions would need pycocotools). The
photos' test view is timm's (resize to size / 0.875, centre crop), normalised with the given mean and
std, for training too: flips and crops would change what "left of" means in a caption. The vocabulary
is the training captions' words seen at least twice. Every caption of an image is a retrieval caption.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from functools import partial

import torch

from shapkern.data.captions import CaptionBundle, CaptionedImages, captions
from shapkern.data.catalog import DEFAULT_DATA_ROOT
from shapkern.data.preprocess import TEST_CROP_PCT, Preprocessing, open_image, preprocess_image
from shapkern.models import WordTokenizer

__all__ = ["CAPTION_DATASETS", "LazyImages", "load_caption_dataset"]

CAPTION_DATASETS = ("captions", "coco-captions", "flickr30k")
PHOTO_CONTEXT_LENGTH = 32  # words per caption kept (COCO's and Flickr30k's are shorter, nearly all)
FLICKR_TEST_IMAGES = 1000


class LazyImages:
    """Images loaded on access: ``images[j]`` is ``load(j)`` (C, H, W); ``images[:n]`` the first n."""

    def __init__(self, load: Callable[[int], torch.Tensor], count: int):
        self.load, self.count = load, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):
        if isinstance(index, slice):
            if index.start not in (None, 0) or index.step not in (None, 1):
                raise ValueError("LazyImages take prefix slices only, images[:n]")
            return LazyImages(self.load, len(range(self.count)[index]))
        if not 0 <= index < self.count:
            raise IndexError(f"image {index} of {self.count}")
        return self.load(index)


def _split(
    files: Sequence[str], texts: Sequence[Sequence[str]], tokenizer: WordTokenizer, load
) -> CaptionedImages:
    """A CaptionedImages of image files and their captions (every one a retrieval caption)."""
    flat = [text for group in texts for text in group]
    owners = torch.tensor([j for j, group in enumerate(texts) for _ in group], dtype=torch.int64)
    images = LazyImages(lambda j: load(files[j]), len(files))
    return CaptionedImages(images, tokenizer(flat), owners, torch.ones(len(flat), dtype=torch.bool), flat)


def _coco(root: str) -> tuple[list, list, list, list]:
    """(train files, train captions, test files, test captions) of COCO 2017 under ``root``."""
    out: list[list] = []
    for split in ("train2017", "val2017"):
        path = os.path.join(root, "coco", "annotations", f"captions_{split}.json")
        with open(path) as f:
            record = json.load(f)
        by_image: dict[int, list[str]] = {}
        for note in record["annotations"]:
            by_image.setdefault(note["image_id"], []).append(note["caption"])
        kept = sorted((image for image in record["images"] if image["id"] in by_image), key=lambda i: i["id"])
        out.append([os.path.join(root, "coco", split, image["file_name"]) for image in kept])
        out.append([by_image[image["id"]] for image in kept])
    return out[0], out[1], out[2], out[3]


def _flickr30k(root: str) -> tuple[list, list, list, list]:
    """(train files, train captions, test files, test captions) of Flickr30k under ``root``."""
    from torchvision.datasets import Flickr30k

    images = os.path.join(root, "flickr30k", "flickr30k-images")
    data = Flickr30k(images, os.path.join(root, "flickr30k", "results_20130124.token"))
    files = [os.path.join(images, name) for name in data.ids]  # sorted by file name
    texts = [data.annotations[name] for name in data.ids]
    cut = max(0, len(files) - FLICKR_TEST_IMAGES)
    return files[:cut], texts[:cut], files[cut:], texts[cut:]


def _photos(name: str, img_size: int, root: str, mean, std) -> CaptionBundle:
    read = {"coco-captions": _coco, "flickr30k": _flickr30k}[name]
    try:
        train_files, train_texts, test_files, test_texts = read(root)
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(
            f"{name}: not found or not readable under {root} ({exc}); see shapkern.data.caption_sets for "
            "the files it reads, and point --data-root at the folder that holds them"
        ) from exc
    if not train_files or not test_files:
        raise ValueError(f"{name} under {root} has no training or no test images")
    prep = Preprocessing(color="RGB", mean=mean, std=std, crop_pct=TEST_CROP_PCT, interpolation="bicubic")
    view = partial(preprocess_image, prep=prep, size=(img_size, img_size), resize=True)
    load = lambda path: view(open_image(path))  # noqa: E731
    tokenizer = WordTokenizer.from_captions((t for group in train_texts for t in group), PHOTO_CONTEXT_LENGTH)
    return CaptionBundle(
        name=name,
        train=_split(train_files, train_texts, tokenizer, load),
        test=_split(test_files, test_texts, tokenizer, load),
        num_classes=0,
        in_chans=3,
        img_size=img_size,
        classes=[],
        preprocessing=prep,
        tokenizer=tokenizer,
    )


def load_caption_dataset(
    spec: str,
    *,
    img_size: int = 32,
    seed: int = 0,
    root: str = DEFAULT_DATA_ROOT,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> CaptionBundle:
    """A captioned dataset of :data:`CAPTION_DATASETS` -> CaptionBundle (items: image, tokens, index).

    ``seed`` fixes the built-in set's images; ``root``, ``mean`` and ``std`` the photo sets' folder
    and normalisation (ImageNet's by default). ValueError for an unknown name or missing files.
    """
    if spec == "captions":
        return captions(img_size, seed=seed)
    if spec not in CAPTION_DATASETS:
        raise ValueError(
            f"unknown caption dataset {spec!r}: --task image-text takes {', '.join(CAPTION_DATASETS)} "
            "(image classification sets are for --task classification)"
        )
    if mean is None or std is None:
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    root = os.path.expanduser(os.fspath(root))
    return _photos(spec, img_size, root, tuple(float(m) for m in mean), tuple(float(s) for s in std))
