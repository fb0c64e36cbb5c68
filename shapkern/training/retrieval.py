"""What an image-text run measures on held-out captioned images, as the trainer's evaluators: retrieval
recall both ways, held-out ℓ_sv, localisation from the text query, and faithfulness of Φ to the model's
own game. :func:`save_caption_heatmaps` draws the final picture of a run: a heatmap per caption."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shapkern.checkpoint import atomic_write
from shapkern.coalitions import CoalitionSampler, Sampler
from shapkern.data import CaptionedImages
from shapkern.engine import patch_grid
from shapkern.explainers.explain import estimate
from shapkern.explainers.metrics import localization, relative_l2
from shapkern.games import ValueFunction
from shapkern.models import ShapleyCLIP
from shapkern.training.distributed import autocast

__all__ = [
    "CaptionFaithfulness",
    "Retrieval",
    "TextLocalization",
    "caption_heatmaps",
    "image_embeddings",
    "recall_at_k",
    "save_caption_heatmaps",
]

EVAL_EPOCH = -1  # coalition seed "epoch" of the held-out ℓ_sv, the same at every evaluation


def recall_at_k(sims: torch.Tensor, text_image: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict:
    """Retrieval recall of similarities (I, T) of I images with T texts, text t describing image
    ``text_image[t]``: image→text, image i is found at k when one of its texts ranks in the top k of
    its row; text→image, text t when its image ranks in the top k of its column (ties count against).

    Returns {"r{k}_i2t", "r{k}_t2i"} for every k, as floats."""
    images = torch.arange(sims.shape[0], device=sims.device)
    own = text_image.view(1, -1) == images.view(-1, 1)  # (I, T)
    best_own = sims.masked_fill(~own, -torch.inf).max(1, keepdim=True).values
    rank_i2t = (sims.masked_fill(own, -torch.inf) >= best_own).sum(1)  # other texts at or above
    right = sims.gather(0, text_image.view(1, -1))  # (1, T)
    rank_t2i = (sims >= right).sum(0) - 1  # other images at or above
    has_text = own.any(1)
    out = {}
    for k in ks:
        out[f"r{k}_i2t"] = float((rank_i2t[has_text] < k).double().mean())
        out[f"r{k}_t2i"] = float((rank_t2i < k).double().mean())
    return out


def _images(data: CaptionedImages, first: int, last: int, device) -> torch.Tensor:
    return torch.stack([data.images[j] for j in range(first, last)]).to(device)


@torch.no_grad()
def image_embeddings(model: ShapleyCLIP, data: CaptionedImages, device, batch: int = 256) -> torch.Tensor:
    """f(x) (I, D) of every image of ``data``, float32."""
    out = []
    for first in range(0, data.num_images, batch):
        with autocast(device):
            out.append(model(_images(data, first, min(first + batch, data.num_images), device)).image.float())
    return torch.cat(out)


@dataclass
class Retrieval:
    """Recall@1 and @5 both ways over the test set's retrieval captions, and the held-out ℓ_sv of the
    similarities with them (fixed coalitions, drawn as the run draws its own)."""

    num_coalitions: int
    seed: int
    batch_size: int = 256
    sampler: Sampler = "shapley"
    paired: bool = True

    @torch.no_grad()
    def __call__(self, model: ShapleyCLIP, data: CaptionedImages, device: torch.device) -> dict:
        texts = data.retrieval.nonzero()[:, 0]
        text = torch.cat([model.encode_text(data.tokens[chunk].to(device)) for chunk in texts.split(1024)])
        images = image_embeddings(model, data, device, self.batch_size)
        sims = model.scale * F.normalize(images, dim=-1) @ text.T  # CLIP's cosine similarity
        record = {f"test_{k}": v for k, v in recall_at_k(sims, data.caption_image[texts].to(device)).items()}
        return {**record, "test_sv": self._held_out_sv(model, data, text, texts, device)}

    def _held_out_sv(self, model, data, text, texts, device) -> float:
        """mean (v_{x,t}(S) − b − Σ_{n∈S} φ_{n,t})² over images, coalitions and first retrieval captions."""
        draw = CoalitionSampler(self.num_coalitions, self.sampler, self.paired, self.seed)
        first_text = torch.full((data.num_images,), len(texts) - 1, dtype=torch.int64).scatter_reduce(
            0, data.caption_image[texts], torch.arange(len(texts)), reduce="amin"
        )  # each image's first retrieval caption
        total, count = 0.0, 0
        for start in range(0, data.num_images, self.batch_size):
            index = torch.arange(start, min(start + self.batch_size, data.num_images))
            coalitions = draw(index, EVAL_EPOCH, model.num_players, device)
            with autocast(device):
                out = model(
                    _images(data, start, int(index[-1]) + 1, device), None, coalitions, paired=self.paired
                )
            assert out.values is not None  # a pass with coalitions
            error = (
                out.values.float() - torch.bmm(coalitions.float(), out.phi.float())
            ) / out.norm.unsqueeze(1)
            own = text[first_text[index]]  # (b, D)
            total += float((model.scale * (error * own.unsqueeze(1)).sum(-1)).square().sum())
            count += error.shape[0] * error.shape[1]
        return total / max(count, 1)


@torch.no_grad()
def caption_heatmaps(
    model: ShapleyCLIP, data: CaptionedImages, captions: torch.Tensor, device
) -> torch.Tensor:
    """exp(τ) Φ(x)·e_t / ‖f(x)‖ (P, N) of the given captions (P,) with their images: each patch's share
    of the similarity, its Shapley value in the model's own game."""
    owners = data.caption_image[captions]
    images = torch.stack([data.images[int(j)] for j in owners]).to(device)
    with autocast(device):
        out = model(images, data.tokens[captions].to(device))
    assert out.text is not None
    return (out.scale * (out.phi.float() * out.text.float().unsqueeze(1)).sum(-1) / out.norm).cpu()


@dataclass
class TextLocalization:
    """Pointing game, AUROC and mIoU of each caption's heatmap Φ(x)·e_t against the cells it names,
    over the captions of the first ``images`` test images (sets with masks only)."""

    images: int

    def __call__(self, model: ShapleyCLIP, data: CaptionedImages, device: torch.device) -> dict:
        if data.cell_masks is None:
            return {}
        captions = (data.caption_image < self.images).nonzero()[:, 0]
        grid = patch_grid(model.image.backbone, model.num_players)
        heat = caption_heatmaps(model, data, captions, device)
        scores = localization(heat, data.patch_masks(grid)[captions] >= 0.5, grid)
        return {f"test_{k}": scores[k] for k in ("pointing", "auroc", "miou")}


@dataclass
class CaptionFaithfulness:
    """‖Φ − φ‖/‖φ‖ of the one-pass Φ (N, D) against a permutation estimate of the Shapley values of
    the model's own embedding game f(x_S), on the first ``images`` test images. The similarity with
    any text is a linear map of it, so this bounds the error of every text's explanation."""

    images: int
    permutations: int
    seed: int

    @torch.no_grad()
    def __call__(self, model: ShapleyCLIP, data: CaptionedImages, device: torch.device) -> dict:
        images = _images(data, 0, min(self.images, data.num_images), device)
        game = ValueFunction(model.coalition_forward(images), images.shape[0], model.num_players, device)
        budget = 2 + 2 * max(2, self.permutations // 2) * (model.num_players - 1)
        with autocast(device):
            phi = model(images).phi
            ref = estimate(
                game, method="permutation", budget=budget, target="all", seed=self.seed, progress=False
            )
        return {"faithfulness_rel_err": float(relative_l2(phi, ref.values).mean())}


@torch.no_grad()
def save_caption_heatmaps(model: ShapleyCLIP, data: CaptionedImages, path: str, *, count: int) -> None:
    """A PNG grid of the first ``count`` test captions, each over its image: Φ(x)·e_t."""
    from shapkern.explainers.viz import plot_grid  # matplotlib: imported where a figure is drawn

    device = next(model.parameters()).device
    captions = torch.arange(min(count, len(data)))
    model.eval()
    maps = caption_heatmaps(model, data, captions, device)
    images = torch.stack([data.images[int(j)] for j in data.caption_image[captions]]).float()
    titles = [textwrap.fill(data.texts[int(i)], 24) for i in captions]  # long captions on several lines
    grid = patch_grid(model.image.backbone, model.num_players)
    fig = plot_grid(images, maps, titles=titles, grid=grid, dpi=110)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
