"""What a run is built from: its data loaders, its model and loss, its optimiser and schedule."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from shapkern.data import CaptionBundle, CaptionedImages, DataBundle, load_caption_dataset, load_dataset
from shapkern.models import ShapleyCLIP, ShapleyViT
from shapkern.models.backbones import pretrained_normalization
from shapkern.training.config import TrainConfig
from shapkern.training.contrastive import ContrastiveLoss, image_text_step
from shapkern.training.distributed import Distributed
from shapkern.training.losses import LossOutput, ShapleyLoss
from shapkern.training.step import shapley_step

__all__ = [
    "RunData",
    "TaskStep",
    "build_loss",
    "build_model",
    "build_optimizer",
    "build_step",
    "cosine_warmup",
    "seed_everything",
]


class RunData:
    """The dataset of a run, its (optionally limited) splits, and this process's training loader.

    Attributes:
        bundle: the DataBundle (classes, preprocessing, ...).
        train_set, test_set: the splits the run uses (``limit_train``/``limit_test`` applied).
        sampler: the DistributedSampler (one shard per process, reshuffled per epoch).
        loader: batches of ``batch_size / world`` (image, label, index) items.
    """

    def __init__(self, cfg: TrainConfig, dist: Distributed):
        mean, std = pretrained_normalization(cfg.model)  # inputs as the backbone's weights expect
        self.bundle = _load(cfg, mean, std)
        self.train_set = _limited(self.bundle.train, cfg.limit_train)
        self.test_set = _limited(self.bundle.test, cfg.limit_test)
        if cfg.batch_size < 1 or cfg.batch_size % dist.world:
            raise ValueError(
                f"batch size {cfg.batch_size} must be positive and divisible by the {dist.world} processes"
            )
        if len(self.train_set) < cfg.batch_size:
            raise ValueError(
                f"{cfg.data} has {len(self.train_set)} training images, fewer than one batch of "
                f"{cfg.batch_size}; add images or lower --batch-size"
            )
        self.sampler: DistributedSampler = DistributedSampler(
            self.train_set, dist.world, dist.rank, shuffle=True, seed=cfg.seed
        )
        self.loader = DataLoader(
            self.train_set,
            batch_size=cfg.batch_size // dist.world,
            sampler=self.sampler,
            num_workers=cfg.num_workers,
        )


def _load(cfg: TrainConfig, mean, std) -> DataBundle:
    if cfg.task == "image-text":
        return load_caption_dataset(
            cfg.data, img_size=cfg.img_size, seed=cfg.seed, root=cfg.data_root, mean=mean, std=std
        )
    return load_dataset(
        cfg.data,
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        seed=cfg.seed,
        skip_bad_images=cfg.skip_bad_images,
        root=cfg.data_root,
        download=cfg.download,
        mean=mean,
        std=std,
    )


def _limited(dataset, limit: int | None):
    if isinstance(dataset, CaptionedImages):  # the first images, with all their captions
        return dataset.first(limit)
    return dataset if limit is None else Subset(dataset, range(min(limit, len(dataset))))


def seed_everything(seed: int) -> None:
    """Seed torch, Python's and numpy's random number generators."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def build_model(cfg: TrainConfig, bundle: DataBundle) -> ShapleyViT | ShapleyCLIP:
    """The model of a config: a ShapleyViT of timm ``cfg.model`` at the data's image size and
    channels, or for image-text a ShapleyCLIP with it as the image tower and the data's vocabulary."""
    kwargs = {**cfg.arch(), "in_chans": bundle.in_chans}
    try:
        if isinstance(bundle, CaptionBundle):
            vocab, context = bundle.tokenizer.vocab, bundle.tokenizer.context_length
            return ShapleyCLIP(
                cfg.model,
                cfg.joint_dim,
                vocab,
                context,
                head=cfg.head,
                contrastive=cfg.contrastive,
                checkpoint=cfg.weights,
                pretrained=cfg.pretrained,
                **kwargs,
            )
        return ShapleyViT(
            cfg.model,
            bundle.num_classes,
            cfg.head,
            checkpoint=cfg.weights,
            pretrained=cfg.pretrained,
            **kwargs,
        )
    except TypeError as exc:  # a timm model that takes none of these keywords: not a ViT
        raise ValueError(f"model {cfg.model!r} cannot be built as a ViT with {kwargs}: {exc}") from exc
    except AssertionError as exc:  # timm's own checks, e.g. heads that do not divide its width
        raise ValueError(f"model {cfg.model!r} cannot be built with {kwargs}: {exc}") from exc


def build_loss(cfg: TrainConfig) -> ShapleyLoss | ContrastiveLoss:
    """The loss of a config: ShapleyLoss, or for image-text the ContrastiveLoss."""
    if cfg.task == "image-text":
        return ContrastiveLoss(cfg.lam, cfg.mu, contrastive=cfg.contrastive, mask_loss=cfg.mask_loss)
    return ShapleyLoss(**cfg.loss_settings())


@dataclass(frozen=True)
class TaskStep:
    """How a task's training step runs, and what its outputs' ``logits`` are scored against.

    Attributes:
        run: (model, loss, images, labels, coalitions, *, paired) -> LossOutput; ``labels`` are the
            loader's (class indices, or for image-text the captions' tokens (B, L)).
        targets: the loader's labels (B, ...) -> (B,) the index of the right column of ``logits``
            (for image-text, caption b of image b: the diagonal).
    """

    run: Callable[..., LossOutput]
    targets: Callable[[torch.Tensor], torch.Tensor]


def _diagonal(labels: torch.Tensor) -> torch.Tensor:
    return torch.arange(labels.shape[0], device=labels.device)


def build_step(cfg: TrainConfig) -> TaskStep:
    """The TaskStep of a config's task."""
    if cfg.task == "image-text":
        return TaskStep(image_text_step, _diagonal)
    return TaskStep(shapley_step, lambda labels: labels)


def cosine_warmup(total_steps: int, warmup_steps: int):
    """LambdaLR factor: linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_optimizer(model: nn.Module, cfg: TrainConfig, steps_per_epoch: int):
    """AdamW (no weight decay on biases, norms and position embeddings) and its warm-up + cosine
    schedule, stepped once per optimiser step: (optimizer, scheduler)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        (decay if p.ndim > 1 and "pos_embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    warmup = max(1, round(cfg.warmup_epochs * steps_per_epoch))
    factor = cosine_warmup(cfg.epochs * steps_per_epoch, warmup)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
