"""Everything a training run depends on, stored in every checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from shapkern.checkpoint import newest_checkpoint
from shapkern.data.catalog import DEFAULT_DATA_ROOT

__all__ = ["SCHEDULE_FIELDS", "TrainConfig", "resumed_config"]

# Fields that define the optimisation schedule: changing them on resume changes the run.
SCHEDULE_FIELDS = ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs")
# Fields of one invocation, not of the run: a resumed run takes them from the command line.
INVOCATION_FIELDS = ("out", "resume", "device", "num_workers", "progress", "max_steps")


@dataclass
class TrainConfig:
    """Settings of one run. Defaults: the digits quick start (2 CPU cores, minutes).

    Data and model: ``data`` (``digits``, ``evidence``, a catalog name such as ``cifar10``, or
    ``imagefolder:PATH``), found under ``data_root`` and fetched there with ``download``; the timm
    ``model`` (``arch`` or ``arch.tag``) with ``img_size``/``patch_size`` and the optional size
    overrides ``depth``, ``embed_dim``, ``num_heads`` (None keeps timm's), the Shapley ``head``, and
    the backbone's weights: timm's ``pretrained`` ones (hub or local cache) or a local ``weights`` file.
    Loss: λ = ``lam`` (ℓ_sv), μ = ``mu`` (ℓ_mask), ``num_coalitions`` paired per image of which
    ``grad_coalitions`` carry gradients, ``sv_scale`` (``raw`` or ``relative``), ``mask_loss`` (``kl``,
    ``ce`` or None), ``stop_grad``. Optimisation: AdamW ``lr``,
    ``weight_decay``, ``warmup_epochs`` of linear warm-up then cosine decay, ``clip_grad``.
    Run: ``seed``, ``out`` folder, ``resume``, ``device`` (``auto``, ``cuda``, ``cpu``), ``max_steps``
    (stop after that many optimiser steps, as a kill would: no checkpoint of the partial epoch).
    """

    data: str = "digits"
    model: str = "vit_tiny_patch16_224"
    img_size: int = 32
    patch_size: int = 8
    depth: int | None = 3
    embed_dim: int | None = 64
    num_heads: int | None = 2
    head: str = "linear"
    weights: str | None = None
    pretrained: bool = False  # timm's pretrained weights of `model` (its tag picks which)
    data_root: str = DEFAULT_DATA_ROOT
    download: bool = False
    epochs: int = 30
    batch_size: int = 64  # global, over all processes
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    clip_grad: float = 1.0
    lam: float = 1.0  # digits: at 1 and 10 the accuracy of λ = 0, error < 0.01 (train_sweeps.py)
    mu: float = 1.0
    num_coalitions: int = 8
    grad_coalitions: int | None = None  # of those, the ones with gradients (None: all; M/4 with stop_grad)
    sv_scale: str = "raw"
    target_precision: str = "auto"  # fp8: e4m3 GEMMs for the forward-only ℓ_sv targets
    mask_loss: str | None = "kl"
    stop_grad: bool = False  # True: no gradient through ℓ_sv's targets (collapses at λ ≥ 1 on digits)
    seed: int = 0
    out: str = "runs/digits"
    resume: bool = False
    device: str = "auto"
    num_workers: int = 0
    skip_bad_images: bool = False
    limit_train: int | None = None  # use only the first n train / test images (smoke runs, tests)
    limit_test: int | None = None
    faith_images: int = 16  # per-epoch faithfulness: images and antithetic permutations
    faith_permutations: int = 16
    heatmap_images: int = 16
    progress: bool = True
    max_steps: int | None = None

    @classmethod
    def from_dict(cls, record: dict) -> TrainConfig:
        """A config from a checkpoint's record; keys this version does not know are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def arch(self) -> dict:
        """The ShapleyViT backbone keywords of this config (see ``ShapleyViT.arch``)."""
        kwargs = {"img_size": self.img_size, "patch_size": self.patch_size}
        for name in ("depth", "embed_dim", "num_heads"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        return kwargs


def resumed_config(cfg: TrainConfig, explicit: set[str]) -> tuple[TrainConfig, list[str]]:
    """The configuration a resumed run continues with: the one saved in the newest checkpoint of
    ``cfg.out``, with the fields named in ``explicit`` (given on the command line) taken from
    ``cfg``, as are the INVOCATION_FIELDS. Returns it and notes on what the explicit fields change
    in the schedule.

    Without a usable checkpoint, ``cfg`` is returned unchanged (the run starts fresh).
    """
    saved = newest_checkpoint(cfg.out).state
    if saved is None or not isinstance(saved.get("config"), dict):
        return cfg, []
    base = TrainConfig.from_dict(saved["config"])
    merged = dataclasses.replace(
        base, **{name: getattr(cfg, name) for name in explicit | set(INVOCATION_FIELDS)}
    )
    notes = [
        f"{name} changed from {getattr(base, name)!r} to {getattr(merged, name)!r}: the learning-rate "
        "schedule of the resumed run differs from the original run's"
        for name in SCHEDULE_FIELDS
        if getattr(base, name) != getattr(merged, name)
    ]
    return merged, notes
