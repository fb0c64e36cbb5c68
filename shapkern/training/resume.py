"""A run's folder across runs: refusing to start over a run, preparing the folder, and continuing
the run of a checkpoint (its file format is :mod:`shapkern.checkpoint`)."""

from __future__ import annotations

import os

import torch
from torch import nn

from shapkern.checkpoint import (
    CHECKPOINT,
    PREVIOUS_CHECKPOINT,
    LoadedCheckpoint,
    checkpoint_to_resume,
    clean_temporary_files,
    set_rng_state,
)
from shapkern.training.config import TrainConfig
from shapkern.training.log import MetricsLog

__all__ = [
    "HEATMAPS",
    "METRICS",
    "RUN_FILES",
    "check_new_run",
    "checkpoint_to_continue",
    "prepare_folder",
    "restore_optimizer",
    "restore_run",
]

METRICS = "metrics.jsonl"
HEATMAPS = "explanations.png"
RUN_FILES = (CHECKPOINT, PREVIOUS_CHECKPOINT, METRICS, HEATMAPS)  # what a run owns in its folder


def checkpoint_to_continue(cfg: TrainConfig) -> LoadedCheckpoint | None:
    """The checkpoint in ``cfg.out`` that a run with ``cfg.resume`` continues (CheckpointError when
    none loads), or None for a new run, which must not start over a run (:func:`check_new_run`)."""
    loaded = checkpoint_to_resume(cfg.out) if cfg.resume else None
    for path, why in loaded.skipped if loaded else ():
        print(f"resume: skipped {path}: {why}", flush=True)
    if loaded is not None and loaded.state is not None:
        return loaded
    check_new_run(cfg)
    if cfg.resume:
        print(f"resume: no checkpoint in {cfg.out} yet; starting a new run", flush=True)
    return None


def check_new_run(cfg: TrainConfig) -> None:
    """ValueError when a new run would start over the run in ``cfg.out`` without cfg.overwrite."""
    found = [
        name for name in (CHECKPOINT, PREVIOUS_CHECKPOINT) if os.path.exists(os.path.join(cfg.out, name))
    ]
    if found and not cfg.overwrite:
        raise ValueError(
            f"{cfg.out} already holds a run ({', '.join(found)}): pass --resume to continue it, "
            "--overwrite to delete it and start a new one, or choose another --out"
        )


def prepare_folder(cfg: TrainConfig, log: MetricsLog, epoch: int) -> None:
    """Remove what killed saves left, delete the old run for an overwrite, and cut metrics.jsonl to
    the ``epoch`` the run continues from (0 for a new run: records a killed run logged go)."""
    for path in clean_temporary_files(cfg.out):
        print(f"removed {path}, left by an interrupted save", flush=True)
    if cfg.overwrite:
        for name in RUN_FILES:
            path = os.path.join(cfg.out, name)
            if os.path.exists(path):
                os.remove(path)
                print(f"overwrite: removed {path}", flush=True)
    log.truncate(epoch)


def restore_run(
    loaded: LoadedCheckpoint,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    data: str,
) -> tuple[int, int, int]:
    """Continue the run of a loaded checkpoint: the weights of ``model``, the optimiser and schedule
    (:func:`restore_optimizer`) and the RNG states; returns the run's counters (completed epochs,
    optimiser steps, skipped steps). ValueError when the checkpoint is of another architecture
    (``model.arch``) or dataset (``data``) than the run's."""
    state, path = loaded.state, loaded.path
    assert state is not None, "restore_run needs a loaded checkpoint"
    saved_data = state.get("data", {}).get("name")
    if state.get("arch") != model.arch or saved_data != data:
        raise ValueError(
            f"checkpoint {path} is from another architecture or dataset: checkpoint "
            f"{state.get('arch')} on {saved_data!r}, run {model.arch} on {data!r}"
        )
    model.load_state_dict(state["model"])
    restore_optimizer(optimizer, scheduler, state)
    set_rng_state(state["rng"])
    print(f"resume: continuing from {path} after epoch {state['epoch']}", flush=True)
    return state["epoch"], state["step"], state.get("skipped_steps", 0)


def restore_optimizer(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict
) -> None:
    """The optimiser's moments and the schedule's position from ``state``, the learning rate and
    weight decay they were built with: a resumed run's --lr and --weight-decay apply (load_state_dict
    alone would bring back the saved ones), on the run's schedule at the step reached."""
    settings = [{k: g[k] for k in ("initial_lr", "weight_decay")} for g in optimizer.param_groups]
    base_lrs = list(scheduler.base_lrs)
    optimizer.load_state_dict(state["optimizer"])
    for group, values in zip(optimizer.param_groups, settings, strict=True):
        group.update(values)
    scheduler.load_state_dict({**state["scheduler"], "base_lrs": base_lrs})
    scheduler.last_epoch -= 1
    scheduler.step()  # every group's lr = base · factor(step), as an unbroken run has it
