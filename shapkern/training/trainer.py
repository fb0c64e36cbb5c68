"""A thin trainer for self-explaining ViTs: plain PyTorch, resumable, DDP-ready.

AdamW with linear warm-up and cosine decay per step, bf16 autocast on CUDA, gradient clipping,
per-epoch evaluation through the evaluators it is given, a JSON-lines metrics log and atomic,
rotating checkpoints holding everything needed to resume bit-exactly: model, optimiser,
scheduler, RNG states and epoch.

Launched with ``torchrun --nproc-per-node K``, it trains with DistributedDataParallel; rank 0
evaluates and writes checkpoints, and the logged training metrics are reduced over all ranks.
Every sample's coalitions are seeded by (seed, epoch, sample index), so a run does not depend on
the number of processes.

What it guards against:

- Two writers: rank 0 holds the output folder's lock (shapkern.runlock) until ``close()``.
- Losing a run: a new run refuses a folder that holds one (``resume`` continues it, ``overwrite``
  deletes it), and a resumed run refuses checkpoints it cannot read instead of starting over.
  Nothing in the folder is written before the data, the model and the checkpoint have loaded.
- Divergence: a step with a non-finite loss or gradient norm stops the run before anything of its
  epoch is written, so the last good checkpoints stay. This costs no host sync per step: each
  step's verdict stays on the device, and the host reads it every NONFINITE_CHECK_EVERY steps and
  before every write (the steps in between are wasted, never saved). With ``skip_nonfinite`` > 0
  such steps are skipped instead (their update is not applied), which needs the verdict on the
  host before the optimiser steps: one sync per step, which that option costs.
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
    CHECKPOINT,
    PREVIOUS_CHECKPOINT,
    checkpoint_to_resume,
    clean_temporary_files,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from shapkern.coalitions import seeded_coalitions
from shapkern.runlock import FolderLock
from shapkern.training.config import TrainConfig
from shapkern.training.distributed import Distributed, autocast
from shapkern.training.evaluation import Evaluator, default_evaluators, save_heatmaps
from shapkern.training.log import EpochMeter, MetricsLog, Progress
from shapkern.training.setup import RunData, build_loss, build_model, build_optimizer

__all__ = ["HEATMAPS", "METRICS", "RUN_FILES", "Trainer", "TrainingDiverged", "train"]

METRICS = "metrics.jsonl"
HEATMAPS = "explanations.png"
RUN_FILES = (CHECKPOINT, PREVIOUS_CHECKPOINT, METRICS, HEATMAPS)  # what a run owns in its folder
NONFINITE_CHECK_EVERY = 50  # optimiser steps between reads of the divergence verdict


class TrainingDiverged(FloatingPointError):
    """A step's loss or gradient norm was not finite (NaN or inf)."""


class Trainer:
    """One training run: ``Trainer(cfg).fit()``, then ``close()``. ``backward``, ``step``,
    ``evaluate`` and ``save`` are public for tests and custom loops; ``evaluators`` default to
    :func:`default_evaluators`."""

    def __init__(self, cfg: TrainConfig, *, evaluators: list[Evaluator] | None = None):
        cfg.validate()
        self.cfg = cfg
        self.dist = Distributed.from_environment(cfg.device)
        self.device = self.dist.device
        self.lock = FolderLock(cfg.out).acquire() if self.dist.is_main else None
        try:
            self._build(evaluators)
        except BaseException:
            self.close()
            raise

    def _build(self, evaluators: list[Evaluator] | None) -> None:
        cfg = self.cfg
        loaded = checkpoint_to_resume(cfg.out) if cfg.resume else None
        for path, why in loaded.skipped if loaded else ():
            print(f"resume: skipped {path}: {why}", flush=True)
        resuming = loaded is not None and loaded.state is not None
        if not resuming:
            self._check_new_run()
        self.data = RunData(cfg, self.dist)
        self.bundle, self.train_set, self.test_set = self.data.bundle, self.data.train_set, self.data.test_set
        self.loader = self.data.loader
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        # A resumed model takes its weights from the checkpoint: no --weights file or hub needed.
        built = dataclasses.replace(cfg, weights=None, pretrained=False) if resuming else cfg
        self.model = build_model(built, self.bundle).to(self.device)
        self.loss = build_loss(cfg)
        self.ddp = self.model
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg, len(self.loader))
        self.evaluators = default_evaluators(cfg) if evaluators is None else evaluators
        self.epoch = 0  # completed epochs
        self.step_count = 0
        self.skipped_steps = 0  # updates not applied for a non-finite loss or gradient (skip_nonfinite)
        self.first_nonfinite = torch.full((), -1, dtype=torch.int64, device=self.device)  # a step index
        self.log = MetricsLog(os.path.join(cfg.out, METRICS))
        if resuming:
            self._restore(loaded.state, loaded.path)
        elif cfg.resume:
            print(f"resume: no checkpoint in {cfg.out} yet; starting a new run", flush=True)
        if self.dist.is_main:
            self._prepare_folder()

    def _check_new_run(self) -> None:
        """ValueError when a new run would start over the run in ``cfg.out`` without cfg.overwrite."""
        out = self.cfg.out
        found = [
            name for name in (CHECKPOINT, PREVIOUS_CHECKPOINT) if os.path.exists(os.path.join(out, name))
        ]
        if found and not self.cfg.overwrite:
            raise ValueError(
                f"{out} already holds a run ({', '.join(found)}): pass --resume to continue it, "
                "--overwrite to delete it and start a new one, or choose another --out"
            )

    def _prepare_folder(self) -> None:
        """Remove what killed saves left, delete the old run for an overwrite, and cut metrics.jsonl to
        the epoch the run continues from (0 for a new run: records a killed run logged go)."""
        for path in clean_temporary_files(self.cfg.out):
            print(f"removed {path}, left by an interrupted save", flush=True)
        if self.cfg.overwrite:
            for name in RUN_FILES:
                path = os.path.join(self.cfg.out, name)
                if os.path.exists(path):
                    os.remove(path)
                    print(f"overwrite: removed {path}", flush=True)
        self.log.truncate(self.epoch)

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "epoch": self.epoch,
            "step": self.step_count,
            "skipped_steps": self.skipped_steps,
            "arch": self.model.arch,
            "data": self.bundle.describe(),
            "config": self.cfg.to_dict(),
        }

    def save(self) -> None:
        """Atomically write the run's state, keeping the previous checkpoint (rank 0 only)."""
        if self.dist.is_main:
            save_checkpoint(self.state(), self.cfg.out)

    def _restore(self, state: dict, path: str) -> None:
        """Continue the run of a loaded checkpoint: weights, optimiser, schedule, RNG and counters."""
        if state.get("arch") != self.model.arch or state.get("data", {}).get("name") != self.bundle.name:
            raise ValueError(
                f"checkpoint {path} is from another architecture or dataset: checkpoint "
                f"{state.get('arch')} on {state.get('data', {}).get('name')!r}, run {self.model.arch} on "
                f"{self.bundle.name!r}"
            )
        self.model.load_state_dict(state["model"])
        self._restore_optimizer(state)
        set_rng_state(state["rng"])
        self.epoch, self.step_count = state["epoch"], state["step"]
        self.skipped_steps = state.get("skipped_steps", 0)
        print(f"resume: continuing from {path} after epoch {self.epoch}", flush=True)

    def _restore_optimizer(self, state: dict) -> None:
        """The optimiser's moments and the schedule's position from ``state``, its learning rate and
        weight decay from ``cfg``: a resumed run's --lr and --weight-decay apply (load_state_dict
        alone would bring back the saved ones), on the schedule of ``cfg`` at the step reached."""
        settings = [{k: g[k] for k in ("initial_lr", "weight_decay")} for g in self.optimizer.param_groups]
        base_lrs = list(self.scheduler.base_lrs)
        self.optimizer.load_state_dict(state["optimizer"])
        for group, values in zip(self.optimizer.param_groups, settings, strict=True):
            group.update(values)
        self.scheduler.load_state_dict({**state["scheduler"], "base_lrs": base_lrs})
        self.scheduler.last_epoch -= 1
        self.scheduler.step()  # every group's lr = base · factor(step), as an unbroken run has it

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

    def step(self, loss: torch.Tensor | None = None) -> bool:
        """Clip the gradients, step the optimiser and the schedule; returns whether the update was
        applied. A non-finite gradient norm or ``loss`` stops the run at the next check_finite, or
        with ``cfg.skip_nonfinite`` skips this update (one host sync per step)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.clip_grad:
            norm = nn.utils.clip_grad_norm_(params, self.cfg.clip_grad)
        else:
            norm = nn.utils.get_total_norm([p.grad for p in params])
        bad = ~torch.isfinite(norm)
        if loss is not None:
            bad |= ~torch.isfinite(loss.detach())
        applied = True
        if self.cfg.skip_nonfinite:
            applied = self.dist.sum([float(bad)])[0] == 0  # the same verdict on every rank
            if not applied:
                self._skip()
        else:  # the first bad step, kept on the device: check_finite reads it
            first = self.first_nonfinite
            self.first_nonfinite = torch.where(bad & (first < 0), self.step_count, first)
        if applied:
            self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        if self.step_count % NONFINITE_CHECK_EVERY == 0:
            self.check_finite()
        return applied

    def _skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        allowed = self.cfg.skip_nonfinite
        if self.skipped_steps > allowed:
            raise TrainingDiverged(self._diverged(self.step_count, f"{self.skipped_steps} such steps so far"))
        if self.dist.is_main:
            print(
                f"step {self.step_count + 1}: the loss or the gradient norm is not finite; update skipped "
                f"({self.skipped_steps} of --skip-nonfinite {allowed})",
                flush=True,
            )

    def check_finite(self) -> None:
        """Raise TrainingDiverged when a step so far had a non-finite loss or gradient norm (one host
        sync; one all-reduce under DDP, so that every rank stops)."""
        first = int(self.first_nonfinite)
        if self.dist.sum([float(first >= 0)])[0] > 0:
            raise TrainingDiverged(self._diverged(first, "the first such step"))

    def _diverged(self, step: int, which: str) -> str:
        where = f"step {step + 1} (epoch {self.epoch + 1}, {which})" if step >= 0 else "another process"
        kept = f"the checkpoint of epoch {self.epoch} is kept" if self.epoch else "no checkpoint was written"
        return (
            f"training diverged: the loss or the gradient norm is not finite (NaN or inf) at {where}. The "
            f"run stopped before writing anything of this epoch to {self.cfg.out}; {kept}. Lower --lr, "
            "check --weights for NaN or inf, keep --clip-grad on, or let --skip-nonfinite N skip such steps."
        )

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
            if self.step(out.total):
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
        epoch's metrics record, empty when no epoch was completed (a complete run has nothing to do).

        Raises TrainingDiverged (see check_finite) before anything of the diverged epoch is written.
        """
        record: dict = {}
        if self.epoch >= self.cfg.epochs:
            if self.dist.is_main:
                print(
                    f"shapkern train: the run in {self.cfg.out} is complete ({self.epoch} epochs done, "
                    f"--epochs {self.cfg.epochs}); nothing to do, nothing written. A larger --epochs "
                    "continues it.",
                    flush=True,
                )
            return record
        if self.dist.is_main:
            print(_run_line(self), flush=True)
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
                self.log.append(record)  # before the checkpoint: resume cuts lines past its epoch
                self.save()
                print(_epoch_line(record), flush=True)
            self.dist.barrier()
        return record

    def close(self) -> None:
        """Release the output folder and leave the process group (safe to call twice)."""
        if self.lock is not None:
            self.lock.release()
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
    """Run (or resume, with ``resume=True``) a training run, and draw its explanation heatmaps when
    it trains its last epoch; returns the last epoch's metrics (empty when nothing was trained)."""
    cfg = dataclasses.replace(cfg or TrainConfig(), **overrides)
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
