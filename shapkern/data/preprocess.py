"""How image files become model inputs, recorded with every dataset and checkpoint.

A :class:`Preprocessing` says how a dataset's images were made from pixels: colour mode, resizing,
and the per-channel normalisation. It is stored in checkpoints, so ``shapkern explain`` feeds a
user's image files to a model exactly as its training data was fed, whatever the dataset.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

__all__ = ["Preprocessing", "pixels_to_unit", "preprocess_image"]


@dataclass(frozen=True)
class Preprocessing:
    """Pixels -> model input: ``((pixels in [0, 1]) - mean) / std`` per channel, then repeated to
    ``channels`` channels.

    Attributes:
        color: PIL mode the image is converted to first, ``"L"`` or ``"RGB"``.
        mean, std: per-channel statistics (one value per channel of ``color``).
        channels: channels the model takes (a grey image is repeated to 3 where needed).
        crop_pct: None: the image must already be the model's size (or is resized to it). A float:
            resize the shorter side to size / crop_pct, then centre-crop (timm's eval transform).
    """

    color: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int = 3
    crop_pct: float | None = None

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, record: dict) -> Preprocessing:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items()})


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


def _to_color(image, color: str) -> np.ndarray:
    """A PIL image in mode ``color`` ("L" or "RGB") as [0, 1] floats, keeping a 16-bit image's depth."""
    if image.mode.startswith("I") or image.mode == "F":  # single-channel 16/32-bit or float
        unit = pixels_to_unit(image)
        return unit if color == "L" else np.repeat(unit[..., None], 3, axis=-1)
    return pixels_to_unit(image.convert(color))


def preprocess_image(
    image, prep: Preprocessing, size: tuple[int, int], *, resize: bool = False
) -> torch.Tensor:
    """A PIL image -> (C, H, W) float32 as the training data was made.

    Args:
        image: a PIL image (any mode, 8 or 16 bits).
        prep: the dataset's :class:`Preprocessing`.
        size: the model's (H, W).
        resize: with ``prep.crop_pct`` None, resize an image of another size instead of raising.
    """
    from PIL import Image

    if prep.crop_pct is not None:
        short = round(min(size) / prep.crop_pct)
        scale = short / min(image.height, image.width)
        image = image.resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC
        )
        left, top = (image.width - size[1]) // 2, (image.height - size[0]) // 2
        image = image.crop((left, top, left + size[1], top + size[0]))
    elif (image.height, image.width) != tuple(size):
        if not resize:
            raise ValueError(
                f"the image is {image.width}x{image.height} pixels but the model takes {size[1]}x{size[0]}; "
                "resize it (--resize)"
            )
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    unit = _to_color(image, prep.color)
    x = torch.from_numpy(np.ascontiguousarray(unit))
    x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)
    mean = torch.tensor(prep.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(prep.std, dtype=torch.float32).view(-1, 1, 1)
    x = (x - mean) / std
    return x.expand(prep.channels, -1, -1).contiguous() if x.shape[0] == 1 else x.contiguous()
