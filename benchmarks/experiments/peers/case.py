"""The problem a peer study explains: one model, one image, one class (:class:`Case`), built from
a random-weight timm ViT and a procedural evidence image, or from a trained checkpoint."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import shapkern
from shapkern.data.synthetic import make_evidence

__all__ = ["Case", "build_case", "trained_case"]


@dataclass
class Case:
    """One image (1, C, H, W) explained for class ``target`` of ``model`` on a ``grid`` of patches
    of ``patch`` pixels; ``evaluations`` counts the model rows run so far."""

    model: nn.Module
    image: torch.Tensor
    target: int
    grid: tuple[int, int]
    patch: tuple[int, int]
    batch_size: int
    evaluations: int = 0

    @property
    def players(self) -> int:
        return self.grid[0] * self.grid[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The model on (M, C, H, W) images, counted: (M, K) logits (a ShapleyViT's f(x))."""
        self.evaluations += images.shape[0]
        out = self.model(images)
        return out.logits if isinstance(out, shapkern.ShapleyOutput) else out

    def upsample(self, grid: torch.Tensor) -> torch.Tensor:
        """(M, rows, cols) per patch -> (M, 1, H, W) per pixel."""
        return grid.repeat_interleave(self.patch[0], 1).repeat_interleave(self.patch[1], 2).unsqueeze(1)

    def pixel_values(self, keep: torch.Tensor) -> np.ndarray:
        """The target's logit with the absent patches' pixels zeroed: bool (M, rows, cols) -> (M,)."""
        keep = keep.to(self.image.device)
        with torch.no_grad():
            out = [
                self.forward(self.image * self.upsample(k))[:, self.target]
                for k in keep.split(self.batch_size)
            ]
        return torch.cat(out).double().cpu().numpy()


def build_case(args, players: int) -> Case:
    """The random-weight model at the setting's image size, the evidence image and its target."""
    import timm

    side = math.isqrt(players)
    if side * side != players:
        raise SystemExit(f"--settings takes square numbers of patches, got {players}")
    torch.manual_seed(args.weights_seed)
    patch = args.patch_size or timm.create_model(args.model, **args.model_kwargs).patch_embed.patch_size[0]
    torch.manual_seed(args.weights_seed)
    model = timm.create_model(args.model, **args.model_kwargs, img_size=side * patch, patch_size=patch)
    model = model.eval().to(args.device)
    image = make_evidence(1, img_size=side * patch, seed=args.image_seed).images[:1].to(args.device)
    with torch.no_grad():
        target = int(model(image).argmax())
    return Case(model, image, target, (side, side), (patch, patch), args.batch_size)


def trained_case(args) -> Case:
    """The ``--checkpoint``'s ShapleyViT, the ``--image-seed``-th test image of its dataset and the
    model's predicted class."""
    from shapkern.cli.explain_inputs import load_model
    from shapkern.data import Preprocessing, load_dataset

    model, data = load_model(str(args.checkpoint), torch.device(args.device))
    arch, players = model.arch, model.num_players
    if args.settings not in (None, [players]):
        raise SystemExit(f"{args.checkpoint} has {players} patches; --settings cannot be {args.settings}")
    prep = Preprocessing.from_dict(data["preprocessing"])
    sizes = {"img_size": arch["img_size"], "patch_size": arch["patch_size"]}
    bundle = load_dataset(data["name"], **sizes, mean=prep.mean, std=prep.std)
    image = bundle.test[args.image_seed][0].unsqueeze(0).to(args.device)
    with torch.no_grad():
        target = int(model(image).logits.argmax())
    side, patch = math.isqrt(players), arch["patch_size"]
    return Case(model.eval(), image, target, (side, side), (patch, patch), args.batch_size)
