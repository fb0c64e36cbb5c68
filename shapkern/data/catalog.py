"""Standard image classification datasets by name, read (and, when asked, downloaded) by torchvision.

| name | torchvision | folder under the data root | train / test | classes | download |
|---|---|---|---|---|---|
| ``cifar10`` | CIFAR10 | ``cifar-10-batches-py/`` | 50,000 / 10,000 | 10 | 170 MB |
| ``cifar100`` | CIFAR100 | ``cifar-100-python/`` | 50,000 / 10,000 | 100 | 169 MB |
| ``pets`` | OxfordIIITPet | ``oxford-iiit-pet/`` | trainval 3,680 / test 3,669 | 37 | 811 MB |
| ``flowers102`` | Flowers102 | ``flowers-102/`` | train + val 2,040 / test 6,149 | 102 | 345 MB |
| ``stl10`` | STL10 | ``stl10_binary/`` | 5,000 / 8,000 (no unlabeled) | 10 | 2.6 GB |
| ``imagenette`` | Imagenette (320 px) | ``imagenette2-320/`` | train 9,469 / val 3,925 | 10 | 341 MB |

Nothing is downloaded unless ``download=True`` (``--download``); a missing dataset is an error that
says so. Downloads by several processes (torchrun) of one machine take turns through a file lock.

Inputs are normalised with the given (mean, std) (the trainer passes what the backbone's pretrained
weights expect), ImageNet's by default, and recorded in the bundle's :class:`Preprocessing`.

Augmentation is random-resized-crop and horizontal flip only. Both transform the whole image before
it is cut into patches: the grid stays the grid, and the Shapley game is defined on the view the
model sees, so ℓ_sv and ℓ_mask stay consistent under them. What is explained at test time is the
deterministic test view recorded in the checkpoint (a bilinear resize, and a centre crop for photos
as in timm's eval transform and imagefolder's), which ``shapkern explain`` reproduces for image
files. Augmentations that mix images or labels (mixup, cutmix) or move patches independently are
not used: they would change what a patch's value means.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from shapkern.data.datasets import DataBundle, IndexedDataset
from shapkern.data.preprocess import TEST_CROP_PCT, Preprocessing, preprocess_image

__all__ = ["CATALOG", "DEFAULT_DATA_ROOT", "catalog_dataset"]

DEFAULT_DATA_ROOT = "~/.cache/shapkern/data"
# Random-resized-crop area range: milder than ImageNet's 0.08, since CIFAR's and STL-10's sources are
# 32-96 px (an 8% crop of a 32-px image is 9 px).
TRAIN_SCALE = (0.25, 1.0)
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")


def _cifar10(root, download, train_tf, test_tf):
    from torchvision.datasets import CIFAR10

    train = CIFAR10(root, train=True, transform=train_tf, download=download)
    return train, CIFAR10(root, train=False, transform=test_tf), list(train.classes)


def _cifar100(root, download, train_tf, test_tf):
    from torchvision.datasets import CIFAR100

    train = CIFAR100(root, train=True, transform=train_tf, download=download)
    return train, CIFAR100(root, train=False, transform=test_tf), list(train.classes)


def _pets(root, download, train_tf, test_tf):
    from torchvision.datasets import OxfordIIITPet

    train = OxfordIIITPet(root, split="trainval", transform=train_tf, download=download)
    return train, OxfordIIITPet(root, split="test", transform=test_tf), list(train.classes)


def _flowers102(root, download, train_tf, test_tf):
    from torch.utils.data import ConcatDataset
    from torchvision.datasets import Flowers102

    # The standard protocol trains on train + val (1,020 + 1,020) and tests on the 6,149 test images.
    parts = [Flowers102(root, split=s, transform=train_tf, download=download) for s in ("train", "val")]
    test = Flowers102(root, split="test", transform=test_tf)
    return ConcatDataset(parts), test, [str(label) for label in range(1, 103)]  # the dataset's label ids


def _stl10(root, download, train_tf, test_tf):
    from torchvision.datasets import STL10

    train = STL10(root, split="train", transform=train_tf, download=download)
    return train, STL10(root, split="test", transform=test_tf), list(STL10_CLASSES)


def _imagenette(root, download, train_tf, test_tf):
    from torchvision.datasets import Imagenette

    train = Imagenette(root, split="train", size="320px", transform=train_tf, download=download)
    test = Imagenette(root, split="val", size="320px", transform=test_tf)
    return train, test, [names[0] for names in train.classes]


@dataclass(frozen=True)
class _Entry:
    load: Callable  # (root, download, train transform, test transform) -> (train, test, class names)
    folder: str  # what torchvision keeps under the data root
    download: str  # its size, for messages
    low_res: bool  # images no larger than a ViT's input: the test view resizes them whole (bilinear)


CATALOG = {
    "cifar10": _Entry(_cifar10, "cifar-10-batches-py", "170 MB", low_res=True),
    "cifar100": _Entry(_cifar100, "cifar-100-python", "169 MB", low_res=True),
    "pets": _Entry(_pets, "oxford-iiit-pet", "811 MB", low_res=False),
    "flowers102": _Entry(_flowers102, "flowers-102", "345 MB", low_res=False),
    "stl10": _Entry(_stl10, "stl10_binary", "2.6 GB", low_res=True),
    "imagenette": _Entry(_imagenette, "imagenette2-320", "341 MB", low_res=False),
}


def _transforms(img_size: int, prep: Preprocessing):
    """(train transform, test transform): PIL image -> (3, S, S) float32.

    The test view is :func:`preprocess_image` itself, so ``shapkern explain`` makes the same input of
    the same image file; training crops and flips first, then normalises the same way.
    """
    from torchvision import transforms as T

    size = (img_size, img_size)
    crop = T.RandomResizedCrop(img_size, scale=TRAIN_SCALE, interpolation=T.InterpolationMode.BICUBIC)
    normalise = partial(preprocess_image, prep=dataclasses.replace(prep, crop_pct=None), size=size)
    train = T.Compose([crop, T.RandomHorizontalFlip(), normalise])
    return train, partial(preprocess_image, prep=prep, size=size, resize=True)


def catalog_dataset(
    name: str,
    img_size: int,
    *,
    root: str | os.PathLike = DEFAULT_DATA_ROOT,
    download: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> DataBundle:
    """A dataset of :data:`CATALOG` with its standard train/test split, as a DataBundle.

    Args:
        name: ``cifar10``, ``cifar100``, ``pets``, ``flowers102``, ``stl10`` or ``imagenette``.
        img_size: the model's input size; train images are random-resized crops of it.
        root: the folder holding the dataset's own folder (``~`` expanded).
        download: fetch it into ``root`` when it is not there.
        mean, std: per-channel normalisation (RGB); both or neither (ImageNet's).

    Raises ValueError for an unknown name, a dataset not found (without ``download``) or a failed download.
    """
    if name not in CATALOG:
        raise ValueError(f"unknown dataset {name!r}; the catalog has {', '.join(CATALOG)}")
    if (mean is None) != (std is None):
        raise ValueError(f"give both mean and std or neither, got mean={mean} and std={std}")
    if mean is None or std is None:  # both, as checked above
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need 3 values (RGB), std positive; got mean={mean}, std={std}")
    entry = CATALOG[name]
    root = os.path.expanduser(os.fspath(root))
    # Photos: resize to size / 0.875 and centre-crop; small images (CIFAR, STL-10): resize whole.
    prep = Preprocessing(color="RGB", mean=mean, std=std, crop_pct=None if entry.low_res else TEST_CROP_PCT)
    train_tf, test_tf = _transforms(img_size, prep)
    lock: contextlib.AbstractContextManager = contextlib.nullcontext()
    if download:  # torchrun: the processes of a machine take turns, the first one downloads
        from filelock import FileLock

        os.makedirs(root, exist_ok=True)
        lock = FileLock(os.path.join(root, f".{name}.download.lock"))
    try:
        with lock:
            train, test, classes = entry.load(root, download, train_tf, test_tf)
    except (RuntimeError, OSError) as exc:  # torchvision: "Dataset not found", network errors
        if download:
            raise ValueError(f"{name}: downloading into {root} failed: {exc}") from exc
        raise ValueError(
            f"{name}: not found in {root} (torchvision looks for {os.path.join(root, entry.folder)}: {exc}). "
            f"Pass --download to fetch it ({entry.download}), or point --data-root at the folder that "
            f"holds {entry.folder}/"
        ) from exc
    return DataBundle(
        name=name,
        train=IndexedDataset(train),
        test=IndexedDataset(test),
        num_classes=len(classes),
        in_chans=3,
        img_size=img_size,
        classes=classes,
        preprocessing=prep,
    )
