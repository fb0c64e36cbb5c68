"""The step's guard: gradient clipping, and a step with a non-finite loss or gradient norm stops the
run (or is skipped).

Stopping costs no host sync per step: each step's verdict stays on the device, and the host reads it
every NONFINITE_CHECK_EVERY steps and before every write (the steps in between are wasted, never
saved). Skipping (``skip`` > 0) needs the verdict on the host before the optimiser steps: one sync
per step, which that option costs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from shapkern.training.distributed import Distributed

__all__ = ["NONFINITE_CHECK_EVERY", "DivergenceGuard", "TrainingDiverged"]

NONFINITE_CHECK_EVERY = 50  # optimiser steps between reads of the divergence verdict


class TrainingDiverged(FloatingPointError):
    """A step's loss or gradient norm was not finite (NaN or inf)."""


class DivergenceGuard:
    """The verdicts on a run's steps.

    Args:
        dist: the process group (every rank reaches the same verdict).
        clip: the gradient norm to clip to (0: no clipping).
        skip: how many bad steps to skip before the run stops (0: stop at the first).
        out: the run folder, named in the message.

    Attributes:
        skipped: the updates not applied so far (restored from a checkpoint on resume).
        first_bad: int64 scalar on the device, the first bad step's index or -1 (``skip`` = 0).
    """

    def __init__(self, dist: Distributed, clip: float, skip: int, out: str):
        self.dist, self.clip, self.skip, self.out = dist, clip, skip, out
        self.skipped = 0
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=dist.device)

    def allows(
        self, parameters: Iterable[nn.Parameter], loss: torch.Tensor | None, step: int, epoch: int
    ) -> bool:
        """Clip the gradients of ``parameters``; whether the update of ``step`` (0-based) may be
        applied, given their norm and ``loss``. Without ``skip`` always (the verdict is kept on the
        device for :meth:`check`); with it, one host sync, and TrainingDiverged past ``skip`` bad
        steps."""
        params = [p for p in parameters if p.grad is not None]
        if self.clip:
            norm = nn.utils.clip_grad_norm_(params, self.clip)
        else:
            norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        bad = ~torch.isfinite(norm)
        if loss is not None:
            bad |= ~torch.isfinite(loss.detach())
        if not self.skip:
            self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)
            return True
        if self.dist.sum([float(bad)])[0] == 0:
            return True
        self.skipped += 1
        if self.skipped > self.skip:
            raise TrainingDiverged(self.message(step, epoch, f"{self.skipped} such steps so far"))
        if self.dist.is_main:
            print(
                f"step {step + 1}: the loss or the gradient norm is not finite; update skipped "
                f"({self.skipped} of --skip-nonfinite {self.skip})",
                flush=True,
            )
        return False

    def check(self, epoch: int) -> None:
        """Raise TrainingDiverged when a step so far had a non-finite loss or gradient norm (one host
        sync; one all-reduce under DDP, so that every rank stops)."""
        first = int(self.first_bad)
        if self.dist.sum([float(first >= 0)])[0] > 0:
            raise TrainingDiverged(self.message(first, epoch, "the first such step"))

    def message(self, step: int, epoch: int, which: str) -> str:
        """What went wrong at ``step`` (-1: on another process) with ``epoch`` epochs complete."""
        where = f"step {step + 1} (epoch {epoch + 1}, {which})" if step >= 0 else "another process"
        kept = f"the checkpoint of epoch {epoch} is kept" if epoch else "no checkpoint was written"
        return (
            f"training diverged: the loss or the gradient norm is not finite (NaN or inf) at {where}. The "
            f"run stopped before writing anything of this epoch to {self.out}; {kept}. Lower --lr, "
            "check --weights for NaN or inf, keep --clip-grad on, or let --skip-nonfinite N skip such steps."
        )
