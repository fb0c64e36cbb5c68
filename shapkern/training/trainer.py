"""A thin trainer for self-explaining ViTs: plain PyTorch, resumable, DDP-ready.

AdamW with linear warm-up and cosine decay per step, bf16 autocast on CUDA, gradient clipping,
per-epoch evaluation through the evaluators it is given, a JSON-lines metrics log and atomic,
rotating checkpoints holding everything needed to resume bit-exactly: model, optimiser,
scheduler, RNG states and epoch.

Launched with ``torchrun --nproc-per-node K``, it trains with DistributedDataParallel; rank 0
evaluates and writes checkpoints, and the logged training metrics are reduced over all ranks.
Every sample's coalitions come from the config's CoalitionSampler, seeded by (seed, epoch, sample
index), so a run does not depend on the number of processes.

What it guards against:

- Two writers: rank 0 holds the output folder's lock (shapkern.runlock) until ``close()``.
- Losing a run: a new run refuses a folder that holds one (``resume`` continues it, ``overwrite``
  deletes it), and a resumed run refuses checkpoints it cannot read instead of starting over.
  Nothing in the folder is written before the data, the model and the checkpoint have loaded.
- Divergence: a step with a non-finite loss or gradient norm stops the run before anything of its
  epoch is written, so the last good checkpoints stay; with ``skip_nonfinite`` > 0 such steps are
  skipped instead (their update is not applied). See :mod:`shapkern.training.guard`.

The pieces: :mod:`~shapkern.training.setup` builds the data, model, loss and optimiser,
:mod:`~shapkern.training.step` evaluates the loss, :mod:`~shapkern.training.guard` watches for
divergence, :mod:`~shapkern.training.resume` handles the run folder and checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch

from shapkern.checkpoint import rng_state, save_checkpoint
from shapkern.data import CaptionedImages
from shapkern.progress import Progress
from shapkern.runlock import FolderLock
from shapkern.threads import ThreadChoice, apply_thread_policy
from shapkern.training.config import TrainConfig
from shapkern.training.distributed import Distributed, autocast
from shapkern.training.evaluation import Evaluator, default_evaluators, metric_labels, save_heatmaps
from shapkern.training.guard import NONFINITE_CHECK_EVERY, DivergenceGuard, TrainingDiverged
from shapkern.training.log import EpochMeter, MetricsLog
from shapkern.training.resume import (
    HEATMAPS,
    METRICS,
    RUN_FILES,
    checkpoint_to_continue,
    prepare_folder,
    restore_run,
)
from shapkern.training.setup import (
    RunData,
    build_loss,
    build_model,
    build_optimizer,
    build_step,
    seed_everything,
)

__all__ = ["HEATMAPS", "METRICS", "RUN_FILES", "Trainer", "TrainingDiverged", "train"]


class Trainer:
    """One training run: ``Trainer(cfg).fit()``, then ``close()``. ``backward``, ``step``,
    ``evaluate`` and ``save`` are public for tests and custom loops; ``evaluators`` default to
    :func:`default_evaluators`."""

    def __init__(self, cfg: TrainConfig, *, evaluators: list[Evaluator] | None = None):
        cfg.validate()
        self.cfg = cfg
        self.dist = Distributed.from_environment(cfg.device)
        self.device = self.dist.device
        # torch's intra-op threads on the CPU (shapkern.threads); before anything runs on them. close()
        # gives the process its own count back (a library caller's setting outlives the run).
        self.threads_before = torch.get_num_threads()
        self.threads: ThreadChoice | None = (
            apply_thread_policy(cfg.threads) if self.device.type == "cpu" else None
        )
        self.lock = FolderLock(cfg.out).acquire() if self.dist.is_main else None
        try:
            self._build(evaluators)
        except BaseException:
            self.close()
            raise

    def _build(self, evaluators: list[Evaluator] | None) -> None:
        cfg = self.cfg
        loaded = checkpoint_to_continue(cfg)  # before anything is built: a new run's folder is checked
        self.data = RunData(cfg, self.dist)
        self.bundle, self.train_set, self.test_set = self.data.bundle, self.data.train_set, self.data.test_set
        self.loader = self.data.loader
        seed_everything(cfg.seed)
        # A resumed model takes its weights from the checkpoint: no --weights file or hub needed.
        built = dataclasses.replace(cfg, weights=None, pretrained=False) if loaded else cfg
        self.model = build_model(built, self.bundle).to(self.device)
        self.ddp = self.dist.wrap(self.model)
        self.loss, self.coalition_sampler = build_loss(cfg), cfg.coalition_sampler()
        self.task_step = build_step(cfg)  # the task's step, and what its logits are scored against
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg, len(self.loader))
        self.evaluators = default_evaluators(cfg) if evaluators is None else evaluators
        self.epoch, self.step_count = 0, 0  # completed epochs and optimiser steps
        self.guard = DivergenceGuard(self.dist, cfg.clip_grad, cfg.skip_nonfinite, cfg.out)
        self.log = MetricsLog(os.path.join(cfg.out, METRICS))
        if loaded:  # weights, optimiser, schedule, RNG states and counters
            restored = restore_run(loaded, self.model, self.optimizer, self.scheduler, self.bundle.name)
            self.epoch, self.step_count, self.guard.skipped = restored
            _note_thread_change(loaded.state or {}, self.threads)
        if self.dist.is_main:
            prepare_folder(cfg, self.log, self.epoch)

    @property
    def skipped_steps(self) -> int:
        """Updates not applied for a non-finite loss or gradient (``skip_nonfinite``)."""
        return self.guard.skipped

    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "epoch": self.epoch,
            "step": self.step_count,
            "skipped_steps": self.skipped_steps,
            "threads": self.threads.threads if self.threads else None,
            "arch": self.model.arch,
            "data": self.bundle.describe(),
            "config": self.cfg.to_dict(),
        }

    def save(self) -> None:
        """Atomically write the run's state, keeping the previous checkpoint (rank 0 only)."""
        if self.dist.is_main:
            save_checkpoint(self.state(), self.cfg.out)

    def backward(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, epoch: int):
        """Loss and gradients of one local batch (coalitions seeded per sample): LossOutput."""
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        coalitions = self.coalition_sampler(indices, epoch, self.model.num_players, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device):
            out = self.task_step.run(self.ddp, self.loss, images, labels, coalitions, paired=self.cfg.paired)
        out.total.backward()
        return out

    def step(self, loss: torch.Tensor | None = None) -> bool:
        """Clip the gradients, step the optimiser and the schedule; returns whether the update was
        applied. A non-finite gradient norm or ``loss`` stops the run at the next check_finite, or
        with ``cfg.skip_nonfinite`` skips this update (one host sync per step)."""
        applied = self.guard.allows(self.model.parameters(), loss, self.step_count, self.epoch)
        if applied:
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step_count += 1
        if self.step_count % NONFINITE_CHECK_EVERY == 0:
            self.check_finite()
        return applied

    def check_finite(self) -> None:
        """Raise TrainingDiverged when a step so far had a non-finite loss or gradient norm."""
        self.guard.check(self.epoch)

    def train_epoch(self, epoch: int) -> dict | None:
        """One epoch; None when ``cfg.max_steps`` stopped it part-way (as a kill would)."""
        self.model.train()
        self.data.sampler.set_epoch(epoch)
        meter = EpochMeter(self.device)
        show = self.cfg.progress and self.dist.is_main
        progress = Progress(
            len(self.loader), f"epoch {epoch + 1}/{self.cfg.epochs}", unit="batch", enabled=show
        )
        for images, labels, indices in self.loader:
            if self.cfg.max_steps is not None and self.step_count >= self.cfg.max_steps:
                progress.close()
                return None
            out = self.backward(images, labels, indices, epoch)
            if self.step(out.total):
                meter.add(out, self.task_step.targets(labels.to(self.device)))
            progress.update(postfix=meter.postfix)
        progress.close()
        return meter.record(self.dist)

    def evaluate(self) -> dict:
        """The evaluators' metrics on the test set, in eval mode."""
        self.model.eval()
        record = {}
        for evaluator in self.evaluators:
            record.update(evaluator(self.model, self.test_set, self.device))
        return record

    def fit(self) -> dict:
        """Train from the current epoch to ``cfg.epochs`` (or ``cfg.max_steps``); returns the last
        epoch's metrics record, empty when no epoch was completed (a complete run has nothing to do).

        Raises TrainingDiverged (see check_finite) before anything of the diverged epoch is written.
        """
        record: dict = {}
        if self.dist.is_main:
            print(_run_line(self) if self.epoch < self.cfg.epochs else _complete_line(self), flush=True)
        while self.epoch < self.cfg.epochs:
            train_record = self.train_epoch(self.epoch)
            self.check_finite()
            if train_record is None:
                break
            self.epoch += 1
            record = {"epoch": self.epoch, **train_record}
            if self.dist.is_main:
                record.update(self.evaluate())
                record.update(step=self.step_count, lr=self.scheduler.get_last_lr()[0], time=time.time())
                if self.threads:
                    record["threads"] = self.threads.threads
                self.log.append(record)  # before the checkpoint: resume cuts lines past its epoch
                self.save()
                print(_epoch_line(record, metric_labels(self.cfg)), flush=True)
            self.dist.barrier()
        return record

    def close(self) -> None:
        """Release the output folder, leave the process group and restore torch's thread count (safe
        to call twice)."""
        if self.lock is not None:
            self.lock.release()
        self.dist.close()
        if torch.get_num_threads() != self.threads_before:
            torch.set_num_threads(self.threads_before)


def _complete_line(trainer: Trainer) -> str:
    cfg = trainer.cfg
    return (
        f"shapkern train: the run in {cfg.out} is complete ({trainer.epoch} epochs done, --epochs "
        f"{cfg.epochs}); nothing to do, nothing written. A larger --epochs continues it."
    )


def _split_sizes(trainer: Trainer) -> str:
    """``2000 train / 500 test`` images; a captioned set's items are captions, so it names both."""
    train, test = trainer.train_set, trainer.test_set
    if isinstance(train, CaptionedImages) and isinstance(test, CaptionedImages):
        return (
            f"{train.num_images} train / {test.num_images} test images, {len(train)} / {len(test)} captions"
        )
    return f"{len(train)} train / {len(test)} test"


def _run_line(trainer: Trainer) -> str:
    cfg, model = trainer.cfg, trainer.model
    params = sum(p.numel() for p in model.parameters()) / 1e6
    threads = f", {trainer.threads}" if trainer.threads else ""
    return (
        f"shapkern train: {cfg.data} ({_split_sizes(trainer)}), "
        f"{cfg.model} {model.num_players} patches, {params:.2f}M params, {trainer.dist.world} "
        f"process(es) on {trainer.device}{threads}, from epoch {trainer.epoch} -> {cfg.out}"
    )


def _note_thread_change(state: dict, threads: ThreadChoice | None) -> None:
    """Say when a resumed CPU run continues on another thread count than its checkpoint was written
    with: torch's CPU LayerNorm backward and small GEMMs sum per-thread partial results, so the
    continuation equals an unbroken run up to rounding, not bitwise."""
    saved = state.get("threads")
    if threads is not None and saved is not None and saved != threads.threads:
        print(
            f"resume: {threads} where the run had {saved}; results agree up to rounding, not bitwise "
            f"(--threads {saved} keeps them bitwise)",
            flush=True,
        )


def _epoch_line(record: dict, labels: dict[str, str]) -> str:
    parts = [f"epoch {record['epoch']}: loss {record['train_loss']:.4f}"]
    parts += [f"{k} {record['train_' + k]:.4f}" for k in ("cls", "sv", "mask")]
    parts += [f"{label} {record[k]:.4f}" for k, label in labels.items() if k in record]
    return ", ".join(parts) + f", {record['images_per_s']:.0f} img/s"


def train(cfg: TrainConfig | None = None, **overrides) -> dict:
    """Run (or resume, with ``resume=True``) a training run, and draw its explanation heatmaps when
    it trains its last epoch; returns the last epoch's metrics (empty when nothing was trained)."""
    cfg = dataclasses.replace(cfg, **overrides) if cfg else TrainConfig.for_task(**overrides)
    trainer = Trainer(cfg)
    try:
        record = trainer.fit()
        if trainer.dist.is_main and cfg.heatmap_images > 0 and record and trainer.epoch == cfg.epochs:
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
