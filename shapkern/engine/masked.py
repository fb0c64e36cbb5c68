"""Pixel masking: any image classifier on images whose absent patches are replaced by a baseline.

The universal fallback (and the Captum/shap style of removal): it works for every model but runs
the full model on every masked image, unlike the packed path, which drops tokens.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from shapkern._deprecation import renamed_arguments
from shapkern.engine.chunking import CPU_MAX_CHUNK_ROWS, check_chunk_rows, run_chunks
from shapkern.engine.inputs import check_coalitions, check_images, patch_grid

__all__ = ["BASELINES", "Baseline", "MaskedInputForward", "masked_input_forward", "model_output"]

# What replaces the pixels of absent patches: zeros, each image's mean per channel, or a blur.
Baseline = Literal["zeros", "mean", "blur"]
BASELINES: tuple[Baseline, ...] = get_args(Baseline)
CUDA_CHUNK_IMAGES = 1024


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(3 * sigma))
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    gauss = torch.exp(-0.5 * (taps / sigma) ** 2)
    gauss = gauss / gauss.sum()
    channels = images.shape[1]
    x = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, gauss.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, gauss.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def _baseline_images(images: torch.Tensor, baseline: Baseline, patch: tuple[int, int]) -> torch.Tensor:
    if baseline == "zeros":
        return torch.zeros_like(images)
    if baseline == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    if baseline == "blur":
        return _gaussian_blur(images, sigma=max(patch) / 2)
    raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")


class MaskedInputForward:
    """Any image classifier on pixel-masked images, with the model and images checked once: the
    pixels of absent patches become ``baseline``.

    Args:
        model: maps (B, C, H, W) to (B, K).
        images: (B, C, H, W).
        baseline: ``"zeros"``, ``"mean"`` (per image and channel) or ``"blur"`` (Gaussian,
            sigma = half a patch).
        chunk_rows: masked images per model call (default 256 on CPU, 1024 on CUDA).
        sync_checks: check the images for non-finite values with a host sync (see ``check_images``).
    """

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        *,
        baseline: Baseline = "zeros",
        chunk_rows: int | None = None,
        sync_checks: bool = False,
    ):
        check_images(images, model, sync=sync_checks)
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
        check_chunk_rows(chunk_rows)
        self.model, self.images, self.baseline = model, images, baseline
        self.chunk_rows = chunk_rows or (
            CUDA_CHUNK_IMAGES if images.device.type == "cuda" else CPU_MAX_CHUNK_ROWS
        )
        self._references: dict[tuple[int, int], torch.Tensor] = {}

    def _reference(self, patch: tuple[int, int]) -> torch.Tensor:
        if patch not in self._references:  # the baseline images of one patch size, made once
            self._references[patch] = _baseline_images(self.images, self.baseline, patch)
        return self._references[patch]

    def __call__(self, coalitions: torch.Tensor) -> torch.Tensor:
        """coalitions bool (B, M, N) or (M, N) -> (B, M, K). The N patches tile the image as a grid:
        the timm patch grid when the model has one, else a square grid."""
        images = self.images
        players = coalitions.shape[-1] if isinstance(coalitions, torch.Tensor) else 0
        grid = patch_grid(self.model, players) if players else (1, 1)
        coalitions = check_coalitions(
            coalitions, images.shape[0], grid[0] * grid[1], images.device, paired=False
        )
        height, width = images.shape[-2:]
        if height % grid[0] or width % grid[1]:
            raise ValueError(
                f"images of size {height}x{width} do not split into a {grid[0]}x{grid[1]} patch grid"
            )
        patch = (height // grid[0], width // grid[1])
        reference = self._reference(patch)
        batch = coalitions.shape[0]

        def run(chunk: torch.Tensor) -> torch.Tensor:
            num = chunk.shape[1]
            pixels = (
                chunk.view(batch, num, *grid).repeat_interleave(patch[0], 2).repeat_interleave(patch[1], 3)
            )
            masked = torch.where(pixels.unsqueeze(2), images.unsqueeze(1), reference.unsqueeze(1))
            out = model_output(self.model(masked.flatten(0, 1)))
            return out.view(batch, num, out.shape[-1])

        return torch.cat(run_chunks(run, coalitions, self.chunk_rows, paired=False), dim=1)


MODEL_OUTPUT_FIELDS = ("logits", "image_embeds", "pooler_output")


def model_output(out) -> torch.Tensor:
    """A model's (R, K) output from what its forward returned: a tensor; an object with ``logits``
    (Hugging Face's ``ImageClassifierOutput``, a ShapleyOutput), ``image_embeds`` (CLIP towers with
    a projection) or ``pooler_output`` (bare Hugging Face models), in that order; or a tuple or list
    led by a tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for field in MODEL_OUTPUT_FIELDS:
        value = getattr(out, field, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(
        f"pixel masking needs a model whose forward returns its (B, K) outputs as a tensor, an object "
        f"with one of {MODEL_OUTPUT_FIELDS}, or a tuple led by a tensor; {type(out).__name__} is none of "
        "these. Wrap the model so that it returns the outputs to explain"
    )


@renamed_arguments(chunk_size="chunk_rows")
def masked_input_forward(
    model: nn.Module,
    images: torch.Tensor,
    coalitions: torch.Tensor,
    *,
    baseline: Baseline = "zeros",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Any image classifier on pixel-masked images: :class:`MaskedInputForward` in one call.

    Args:
        model: maps (B, C, H, W) to (B, K) (a tensor, a tuple led by one, or an object with
            ``logits``).
        images: (B, C, H, W).
        coalitions: bool (B, M, N) or (M, N).
        baseline: ``"zeros"``, ``"mean"`` or ``"blur"``.
        chunk_rows: masked images, (image, coalition) rows, per model call (default 256 on CPU,
            1024 on CUDA).

    Returns:
        (B, M, K).
    """
    return MaskedInputForward(model, images, baseline=baseline, chunk_rows=chunk_rows)(coalitions)
