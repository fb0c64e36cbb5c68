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
import os
import random
import time

import numpy as np
import torch
from torch import nn

from shapkern.checkpoint import (
    clean_temporary_files,
    newest_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from shapkern.coalitions import seeded_coalitions
from shapkern.training.config import TrainConfig
from shapkern.training.distributed import Distributed, autocast
from shapkern.training.evaluation import Evaluator, default_evaluators, save_heatmaps
from shapkern.training.log import EpochMeter, MetricsLog, Progress
from shapkern.training.setup import RunData, build_loss, build_model, build_optimizer

__all__ = ["HEATMAPS", "METRICS", "Trainer", "train"]

METRICS = "metrics.jsonl"
HEATMAPS = "explanations.png"


class Trainer:
    """One training run: ``Trainer(cfg).fit()``. ``backward``, ``step``, ``evaluate`` and ``save``
    are public for tests and custom loops; ``evaluators`` default to :func:`default_evaluators`."""

    def __init__(self, cfg: TrainConfig, *, evaluators: list[Evaluator] | None = None):
        self.cfg = cfg
        self.dist = Distributed.from_environment(cfg.device)
        self.device = self.dist.device
        self.data = RunData(cfg, self.dist)
        self.bundle, self.train_set, self.test_set = self.data.bundle, self.data.train_set, self.data.test_set
        self.loader = self.data.loader
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model = build_model(cfg, self.bundle).to(self.device)
        self.loss = build_loss(cfg)
        self.ddp = self.model
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg, len(self.loader))
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
        self.data.sampler.set_epoch(epoch)
        meter = EpochMeter(self.device)
        show = self.cfg.progress and self.dist.is_main
        progress = Progress(len(self.loader), f"epoch {epoch + 1}/{self.cfg.epochs}", enabled=show)
        for images, labels, indices in self.loader:
            if self.cfg.max_steps is not None and self.step_count >= self.cfg.max_steps:
                progress.close()
                return None
            out = self.backward(images, labels, indices, epoch)
            self.step()
            meter.add(out, labels.to(self.device))
            progress.update(meter.postfix)
        progress.close()
        return meter.record(self.dist)

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
            print(_run_line(self), flush=True)
        while self.epoch < self.cfg.epochs:
            train_record = self.train_epoch(self.epoch)
            if train_record is None:
                break
            self.epoch += 1
            record = {"epoch": self.epoch, **train_record}
            if self.dist.is_main:
                record.update(self.evaluate())
                record.update(step=self.step_count, lr=self.scheduler.get_last_lr()[0], time=time.time())
                self.log.append(record)  # before the checkpoint: resume cuts lines past its epoch
                self.save()
                print(_epoch_line(record), flush=True)
            self.dist.barrier()
        return record

    def close(self) -> None:
        self.dist.close()


def _run_line(trainer: Trainer) -> str:
    cfg, model = trainer.cfg, trainer.model
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return (
        f"shapkern train: {cfg.data} ({len(trainer.train_set)} train / {len(trainer.test_set)} test), "
        f"{cfg.model} {model.num_players} patches, {params:.2f}M params, {trainer.dist.world} "
        f"process(es) on {trainer.device}, from epoch {trainer.epoch} -> {cfg.out}"
    )


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
