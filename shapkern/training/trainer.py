"""A thin trainer for self-explaining ViTs: plain PyTorch, resumable, DDP-ready.

AdamW with linear warm-up and cosine decay per step, bf16 autocast on CUDA, gradient clipping,
per-epoch evaluation through the evaluators it is given, a JSON-lines metrics log and atomic,
rotating checkpoints holding everything needed to resume bit-exactly: model, optimiser,
scheduler, RNG states and epoch.

Launched with ``torchrun --nproc-per-node K``, it trains with DistributedDataParallel; rank 0
evaluates and writes checkpoints, and the logged training metrics are reduced over all ranks.
Every sample's coalitions are seeded by (seed, epoch, sample index), so a run does not depend on
the number of processes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from shapkern.checkpoint import (
    clean_temporary_files,
    newest_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from shapkern.coalitions import seeded_coalitions
from shapkern.data import DataBundle, load_dataset
from shapkern.models import ShapleyViT
from shapkern.models.backbones import pretrained_normalization
from shapkern.training.config import TrainConfig
from shapkern.training.distributed import Distributed, autocast
from shapkern.training.evaluation import Evaluator, default_evaluators, save_heatmaps
from shapkern.training.log import MetricsLog, Progress
from shapkern.training.losses import ShapleyLoss

__all__ = ["HEATMAPS", "METRICS", "Trainer", "build_model", "cosine_warmup", "train"]

METRICS = "metrics.jsonl"
HEATMAPS = "explanations.png"
LOSS_PARTS = ("loss", "cls", "sv", "mask")


def build_model(cfg: TrainConfig, bundle: DataBundle) -> ShapleyViT:
    """The ShapleyViT of a config: timm ``cfg.model`` at the data's image size and channels."""
    kwargs = {**cfg.arch(), "in_chans": bundle.in_chans}
    try:
        weights = {"checkpoint": cfg.weights, "pretrained": cfg.pretrained}
        return ShapleyViT(cfg.model, bundle.num_classes, cfg.head, **weights, **kwargs)
    except TypeError as exc:  # a timm model that takes none of these keywords: not a ViT
        raise ValueError(f"model {cfg.model!r} cannot be built as a ViT with {kwargs}: {exc}") from exc


def cosine_warmup(total_steps: int, warmup_steps: int):
    """LambdaLR factor: linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _limited(dataset, limit: int | None):
    return Subset(dataset, range(min(limit, len(dataset)))) if limit else dataset


class Trainer:
    """One training run: ``Trainer(cfg).fit()``. ``backward``, ``step``, ``evaluate`` and ``save``
    are public for tests and custom loops; ``evaluators`` default to :func:`default_evaluators`."""

    def __init__(self, cfg: TrainConfig, *, evaluators: list[Evaluator] | None = None):
        self.cfg = cfg
        self.dist = Distributed.from_environment(cfg.device)
        self.device = self.dist.device
        mean, std = pretrained_normalization(cfg.model)  # inputs as the backbone's weights expect
        self.bundle = load_dataset(
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
        self.train_set = _limited(self.bundle.train, cfg.limit_train)
        self.test_set = _limited(self.bundle.test, cfg.limit_test)
        if cfg.batch_size < 1 or cfg.batch_size % self.dist.world:
            raise ValueError(
                f"batch size {cfg.batch_size} must be positive and divisible by the "
                f"{self.dist.world} processes"
            )
        if len(self.train_set) < cfg.batch_size:
            raise ValueError(
                f"{cfg.data} has {len(self.train_set)} training images, fewer than one batch of "
                f"{cfg.batch_size}; "
                "add images or lower --batch-size"
            )
        self.sampler = DistributedSampler(
            self.train_set, self.dist.world, self.dist.rank, shuffle=True, seed=cfg.seed
        )
        self.loader = DataLoader(
            self.train_set,
            batch_size=cfg.batch_size // self.dist.world,
            sampler=self.sampler,
            num_workers=cfg.num_workers,
        )
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model = build_model(cfg, self.bundle).to(self.device)
        self.loss = ShapleyLoss(
            cfg.lam,
            cfg.mu,
            cfg.num_coalitions,
            stop_grad=cfg.stop_grad,
            mask_loss=cfg.mask_loss,
            grad_coalitions=cfg.grad_coalitions,
            sv_scale=cfg.sv_scale,
        )
        self.ddp = self.model
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=cfg.lr)
        steps = len(self.loader)
        warmup = max(1, round(cfg.warmup_epochs * steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_warmup(cfg.epochs * steps, warmup)
        )
        self.evaluators = default_evaluators(cfg) if evaluators is None else evaluators
        self.epoch = 0  # completed epochs
        self.step_count = 0
        self.log = MetricsLog(os.path.join(cfg.out, METRICS))
        if self.dist.is_main:
            os.makedirs(cfg.out, exist_ok=True)
            for path in clean_temporary_files(cfg.out):
                print(f"removed {path}, left by an interrupted save", flush=True)
        if cfg.resume:
            self.resume()

    def _param_groups(self) -> list[dict]:
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (decay if p.ndim > 1 and "pos_embed" not in name else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": self.cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "epoch": self.epoch,
            "step": self.step_count,
            "arch": self.model.arch,
            "data": self.bundle.describe(),
            "config": self.cfg.to_dict(),
        }

    def save(self) -> None:
        """Atomically write the run's state, keeping the previous checkpoint (rank 0 only)."""
        if self.dist.is_main:
            save_checkpoint(self.state(), self.cfg.out)

    def resume(self) -> None:
        """Restore the run from the newest usable checkpoint in ``cfg.out``; none yet: start fresh."""
        loaded = newest_checkpoint(self.cfg.out, map_location=self.device)
        for path, why in loaded.skipped:
            print(f"resume: skipped {path}: {why}", flush=True)
        if loaded.state is None:
            print(f"resume: no checkpoint in {self.cfg.out} yet; starting a new run", flush=True)
            return
        state, path = loaded.state, loaded.path
        if state.get("arch") != self.model.arch or state.get("data", {}).get("name") != self.bundle.name:
            raise ValueError(
                f"checkpoint {path} is from another architecture or dataset: checkpoint "
                f"{state.get('arch')} on {state.get('data', {}).get('name')!r}, run {self.model.arch} on "
                f"{self.bundle.name!r}"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.epoch, self.step_count = state["epoch"], state["step"]
        if self.dist.is_main:
            self.log.truncate(self.epoch)
        print(f"resume: continuing from {path} after epoch {self.epoch}", flush=True)

    # ------------------------------------------------------------------ steps
    def backward(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, epoch: int):
        """Loss and gradients of one local batch (coalitions seeded per sample): LossOutput."""
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        coalitions = seeded_coalitions(
            indices,
            seed=self.cfg.seed,
            epoch=epoch,
            num=self.cfg.num_coalitions,
            players=self.model.num_players,
            device=self.device,
        )
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device):
            out = self.loss(self.ddp, images, labels, coalitions)
        out.total.backward()
        return out

    def step(self) -> None:
        """Clip the gradients, step the optimiser and the schedule."""
        if self.cfg.clip_grad:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1

    def train_epoch(self, epoch: int) -> dict | None:
        """One epoch; None when ``cfg.max_steps`` stopped it part-way (as a kill would)."""
        self.model.train()
        self.sampler.set_epoch(epoch)
        sums = torch.zeros(len(LOSS_PARTS) + 1, dtype=torch.float64, device=self.device)  # parts, correct
        seen = 0
        start = time.perf_counter()
        progress = Progress(
            len(self.loader),
            f"epoch {epoch + 1}/{self.cfg.epochs}",
            enabled=self.cfg.progress and self.dist.is_main,
        )
        for images, labels, indices in self.loader:
            if self.cfg.max_steps is not None and self.step_count >= self.cfg.max_steps:
                progress.close()
                return None
            out = self.backward(images, labels, indices, epoch)
            self.step()
            n = labels.shape[0]
            correct = (out.logits.argmax(-1) == labels.to(self.device)).sum()
            parts = torch.stack([out.total.detach(), out.cls, out.sv, out.mask]).double() * n
            sums += torch.cat([parts, correct.double().view(1)])  # on the device: no host sync per step
            seen += n
            progress.update(
                lambda s=sums, n_seen=seen: {
                    k: f"{v / n_seen:.3f}" for k, v in zip(LOSS_PARTS, s.tolist(), strict=False)
                }
            )
        progress.close()
        elapsed = time.perf_counter() - start
        totals = self.dist.sum([*sums.tolist(), seen])  # every rank's batches, one all-reduce
        seen_all = max(totals[-1], 1)
        record = {f"train_{k}": v / seen_all for k, v in zip(LOSS_PARTS, totals, strict=False)}
        record["train_acc"] = totals[len(LOSS_PARTS)] / seen_all
        record["images_per_s"] = totals[-1] / elapsed
        record["epoch_time_s"] = elapsed
        return record

    def evaluate(self) -> dict:
        """The evaluators' metrics on the test set, in eval mode."""
        self.model.eval()
        record = {}
        for evaluator in self.evaluators:
            record.update(evaluator(self.model, self.test_set, self.device))
        return record

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        """Train from the current epoch to ``cfg.epochs`` (or ``cfg.max_steps``); returns the last
        epoch's metrics record."""
        record: dict = {}
        if self.dist.is_main:
            params = sum(p.numel() for p in self.model.parameters()) / 1e6
            print(
                f"shapkern train: {self.cfg.data} ({len(self.train_set)} train / {len(self.test_set)} test), "
                f"{self.cfg.model} {self.model.num_players} patches, {params:.2f}M params, {self.dist.world} "
                f"process(es) on {self.device}, from epoch {self.epoch} -> {self.cfg.out}",
                flush=True,
            )
        while self.epoch < self.cfg.epochs:
            train_record = self.train_epoch(self.epoch)
            if train_record is None:
                break
            self.epoch += 1
            record = {"epoch": self.epoch, **train_record}
            if self.dist.is_main:
                record.update(self.evaluate())
                record.update(step=self.step_count, lr=self.scheduler.get_last_lr()[0], time=time.time())
                self.log.append(
                    record
                )  # before the checkpoint: resume cuts lines past the checkpoint's epoch
                self.save()
                print(_epoch_line(record), flush=True)
            self.dist.barrier()
        return record

    def close(self) -> None:
        self.dist.close()


def _epoch_line(record: dict) -> str:
    parts = [f"epoch {record['epoch']}: loss {record['train_loss']:.4f}"]
    parts += [f"{k} {record['train_' + k]:.4f}" for k in ("cls", "sv", "mask")]
    parts += [f"{k} {record[k]:.4f}" for k in ("test_acc", "test_sv", "faithfulness_rel_err") if k in record]
    return ", ".join(parts) + f", {record['images_per_s']:.0f} img/s"


def train(cfg: TrainConfig | None = None, **overrides) -> dict:
    """Run (or resume, with ``resume=True``) a training run and draw its explanation heatmaps;
    returns the last epoch's metrics."""
    cfg = dataclasses.replace(cfg or TrainConfig(), **overrides)
    trainer = Trainer(cfg)
    try:
        record = trainer.fit()
        if trainer.dist.is_main and cfg.heatmap_images > 0 and trainer.epoch == cfg.epochs:
            path = os.path.join(cfg.out, HEATMAPS)
            save_heatmaps(
                trainer.model,
                trainer.test_set,
                path,
                count=cfg.heatmap_images,
                classes=trainer.bundle.classes,
            )
        trainer.dist.barrier()
        return record
    finally:
        trainer.close()
