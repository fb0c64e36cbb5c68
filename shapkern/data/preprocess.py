"""How image files become model inputs, recorded with every dataset and checkpoint.

A :class:`Preprocessing` says how a dataset's images were made from pixels: colour mode, resizing,
and the per-channel normalisation. It is stored in checkpoints, so ``shapkern explain`` feeds a
user's image files to a model exactly as its training data was fed, whatever the dataset.

One path for every file: :func:`open_image` reads it (refusing possible decompression bombs),
:func:`decode_image` scales its pixels to [0, 1] by bit depth (8 or 16 bits), and
:func:`preprocess_image` makes the test view from it. Training (imagefolder's random crops) and
``shapkern explain`` both start from :func:`decode_image`, so a 16-bit PNG means the same in both.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, cast

import numpy as np
import torch

__all__ = [
    "INTERPOLATIONS",
    "TEST_CROP_PCT",
    "PixelLimitError",
    "Preprocessing",
    "decode_image",
    "open_image",
    "pixels_to_unit",
    "preprocess_image",
]

TEST_CROP_PCT = 0.875  # the test view of photos (timm's eval default): resize to size / 0.875, centre crop
INTERPOLATIONS = ("bilinear", "bicubic")  # torchvision's InterpolationMode names


@dataclass(frozen=True)
class Preprocessing:
    """Pixels -> model input: ``((pixels in [0, 1]) - mean) / std`` per channel, then repeated to
    ``channels`` channels.

    Attributes:
        color: PIL mode the image is converted to first, ``"L"`` or ``"RGB"``.
        mean, std: per-channel statistics (one value per channel of ``color``).
        channels: channels the model takes (a grey image is repeated to 3 where needed).
        crop_pct: None: the image must already be the model's size (or is resized to it). A float:
            timm's eval transform: resize the shorter side to floor(size / crop_pct), then crop the
            centre (torchvision's Resize and CenterCrop).
        interpolation: the resize filter, one of :data:`INTERPOLATIONS` (records written before
            it existed resized bilinearly: timm's default, which imagefolder's test view used).
    """

    color: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int = 3
    crop_pct: float | None = None
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.color not in ("L", "RGB"):
            raise ValueError(f"Preprocessing color must be 'L' or 'RGB', got {self.color!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"Preprocessing interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}"
            )

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, record: dict, *, source: str = "preprocessing record") -> Preprocessing:
        """The record of :meth:`to_dict` (a checkpoint's ``data["preprocessing"]``).

        Raises ValueError, naming ``source``, for a key this version does not know (a newer
        shapkern wrote it: ignoring it could change the inputs silently), a missing key or a bad value.
        """
        known = [f.name for f in fields(cls)]
        unknown = [k for k in record if k not in known]
        if unknown:
            from shapkern import __version__

            raise ValueError(
                f"{source}: the preprocessing record has unknown key {unknown[0]!r}"
                f"{f' (and {unknown[1:]})' if len(unknown) > 1 else ''}; shapkern {__version__} knows "
                f"{', '.join(known)}. A newer shapkern wrote it: explain this checkpoint with that version"
            )
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in record]
        if missing:
            raise ValueError(
                f"{source}: the preprocessing record is missing key {', '.join(map(repr, missing))}"
            )
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in record.items()}
        try:
            return cls(**values)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None


class PixelLimitError(ValueError):
    """An image file over PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``)."""


def _pixel_limit_error(path: str, pixels: int | None, limit: int) -> PixelLimitError:
    count = "more than twice that many" if pixels is None else f"{pixels:,}"
    return PixelLimitError(
        f"{path} has {count} pixels, over PIL's decompression-bomb limit of {limit:,} "
        "(PIL.Image.MAX_IMAGE_PIXELS): a file this large may be built to exhaust memory. If it is a "
        "genuine image, downscale it first (the model sees it at its input size anyway), or, in Python, "
        "raise PIL.Image.MAX_IMAGE_PIXELS for files you trust"
    )


def open_image(path: str):
    """The decoded PIL image in a file, in its own mode (8 or 16 bits).

    Raises :class:`PixelLimitError` (a ValueError) naming the file and its pixel count for an image
    over ``PIL.Image.MAX_IMAGE_PIXELS`` (where PIL itself only warns, and over twice that, where it
    raises); PIL's own errors for unreadable files (``UnidentifiedImageError``, ``OSError``, ...)
    pass through.
    """
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, naming the file
            with Image.open(path) as image:
                if limit is not None and image.width * image.height > limit:
                    raise _pixel_limit_error(path, image.width * image.height, limit)
                image.load()
                return image.copy()
    except Image.DecompressionBombError as exc:  # over twice the limit: PIL refuses before we see the size
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        # PIL raises it only under a limit (MAX_IMAGE_PIXELS not None).
        raise _pixel_limit_error(path, int(pixels[1]) if pixels else None, cast(int, limit)) from None


def pixels_to_unit(image) -> np.ndarray:
    """A PIL image as float32 (H, W) or (H, W, C) in [0, 1], scaled by its bit depth (8 or 16 bits)."""
    array = np.asarray(image)
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):  # PIL mode "F": taken as already in [0, 1]
        return np.clip(array.astype(np.float32), 0.0, 1.0)
    if image.mode.startswith("I"):  # 16-bit PNGs open as "I;16" or "I" (32-bit container)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        return np.clip(array.astype(np.float32) / peak, 0.0, 1.0)
    return array.astype(np.float32) / float(np.iinfo(array.dtype).max)


def decode_image(image, color: str) -> torch.Tensor:
    """A PIL image (any mode, 8 or 16 bits) -> (C, H, W) float32 in [0, 1] in mode ``color``
    ("L": C = 1, "RGB": C = 3), keeping a 16-bit image's depth (a plain ``convert`` would clip it)."""
    if image.mode.startswith("I") or image.mode == "F":  # single-channel 16/32-bit or float
        unit = pixels_to_unit(image)
        unit = unit if color == "L" else np.repeat(unit[..., None], 3, axis=-1)
    else:
        unit = pixels_to_unit(image.convert(color))
    x = torch.from_numpy(np.ascontiguousarray(unit))
    return x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1).contiguous()


def _view(x: torch.Tensor, prep: Preprocessing, size: tuple[int, int], resize: bool) -> torch.Tensor:
    """The test view of a decoded image (C, H, W) at the model's ``size`` (H, W)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    mode = InterpolationMode(prep.interpolation)
    if prep.crop_pct is not None:  # timm's eval transform: Resize(floor(size / crop_pct)), CenterCrop(size)
        x = TF.center_crop(
            TF.resize(x, math.floor(min(size) / prep.crop_pct), mode, antialias=True), list(size)
        )
    elif tuple(x.shape[-2:]) != tuple(size):
        if not resize:
            raise ValueError(
                f"the image is {x.shape[-1]}x{x.shape[-2]} pixels but the model takes {size[1]}x{size[0]}; "
                "resize it (--resize)"
            )
        x = TF.resize(x, list(size), mode, antialias=True)
    return x.clamp(0.0, 1.0)  # bicubic overshoots; PIL's 8-bit resize clips the same way


def preprocess_image(
    image, prep: Preprocessing, size: tuple[int, int], *, resize: bool = False
) -> torch.Tensor:
    """A PIL image -> (C, H, W) float32 as the training data's test view was made.

    Args:
        image: a PIL image (any mode, 8 or 16 bits).
        prep: the dataset's :class:`Preprocessing`.
        size: the model's (H, W).
        resize: with ``prep.crop_pct`` None, resize an image of another size instead of raising.
    """
    x = _view(decode_image(image, prep.color), prep, size, resize)
    mean = torch.tensor(prep.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(prep.std, dtype=torch.float32).view(-1, 1, 1)
    x = (x - mean) / std
    return x.expand(prep.channels, -1, -1).contiguous() if x.shape[0] == 1 else x.contiguous()
