"""What a run reports: the JSON-lines metrics file and the training metrics of an epoch (progress on
the terminal or in a log: :mod:`shapkern.progress`)."""

from __future__ import annotations

import json
import os
import time

import torch

from shapkern.checkpoint import atomic_write, reported_write

__all__ = ["LOSS_PARTS", "EpochMeter", "MetricsLog"]


class MetricsLog:
    """``metrics.jsonl``: one JSON record per epoch, appended."""

    def __init__(self, path: str):
        self.path = path

    def append(self, record: dict) -> None:
        with reported_write(self.path), open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _lines(self) -> list[str]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return f.readlines()

    def records(self) -> list[dict]:
        """The complete records; a half-written last line (a kill during a write) is dropped."""
        out = []
        for line in self._lines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def truncate(self, epoch: int) -> None:
        """Keep the records up to ``epoch`` (those a checkpoint of that epoch covers), dropping
        half-written lines; the file is rewritten only when that changes it."""
        lines = self._lines()
        kept = [r for r in self.records() if r.get("epoch", 0) <= epoch]
        if len(kept) == len(lines) and all(line.endswith("\n") for line in lines):
            return

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)

        atomic_write(self.path, write)


LOSS_PARTS = ("loss", "cls", "sv", "mask")


class EpochMeter:
    """Sums of the loss components and correct predictions of an epoch, kept on the device (no host
    sync per step), reduced over all processes once at the end."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(LOSS_PARTS) + 1, dtype=torch.float64, device=device)
        self.seen = 0
        self.start = time.perf_counter()

    def add(self, out, labels: torch.Tensor) -> None:
        """One batch: ``out`` a LossOutput, labels (b,) on its device."""
        n = labels.shape[0]
        parts = torch.stack([out.total.detach(), out.cls, out.sv, out.mask]).double() * n
        correct = (out.logits.argmax(-1) == labels).sum().double().view(1)
        self.sums += torch.cat([parts, correct])
        self.seen += n

    def postfix(self) -> dict[str, str]:
        """The running means, for a progress display (reads the device)."""
        return {
            k: f"{v / max(self.seen, 1):.3f}" for k, v in zip(LOSS_PARTS, self.sums.tolist(), strict=False)
        }

    def record(self, dist) -> dict:
        """train_loss, train_cls, train_sv, train_mask, train_acc, images_per_s, epoch_time_s over
        every process's batches (one all-reduce)."""
        elapsed = time.perf_counter() - self.start
        totals = dist.sum([*self.sums.tolist(), self.seen])
        seen = max(totals[-1], 1)
        record = {f"train_{k}": v / seen for k, v in zip(LOSS_PARTS, totals, strict=False)}
        record["train_acc"] = totals[len(LOSS_PARTS)] / seen
        record["images_per_s"] = totals[-1] / elapsed
        record["epoch_time_s"] = elapsed
        return record
