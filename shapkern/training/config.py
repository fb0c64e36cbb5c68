"""Everything a training run depends on, stored in every checkpoint."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Literal, get_args

from shapkern.checkpoint import checkpoint_to_resume
from shapkern.coalitions import SAMPLERS, CoalitionSampler, Sampler
from shapkern.data.catalog import DEFAULT_DATA_ROOT
from shapkern.engine import Precision
from shapkern.models import CONTRASTIVES, HEADS, Contrastive, Head
from shapkern.training.contrastive import ContrastiveLoss
from shapkern.training.distributed import DEVICES
from shapkern.training.losses import MaskLoss, ShapleyLoss, SvScale, graded_coalitions

__all__ = ["SCHEDULE_FIELDS", "TASKS", "Task", "TrainConfig", "resumed_config"]

# What a run trains: a self-explaining classifier (ShapleyViT), or a self-explaining image-text
# model (ShapleyCLIP) on captioned images. TASK_DEFAULTS: the fields whose default depends on it.
Task = Literal["classification", "image-text"]
TASKS: tuple[Task, ...] = get_args(Task)
TASK_DEFAULTS: dict[Task, dict] = {
    "classification": {},
    # μ = 0.01: at μ = 1 the masked images' KL to the full image's text distribution (which a masked
    # image, missing objects a caption names, cannot match) cost 8 points of text→image recall@1, and
    # at μ = 0.1 it pulled a masked image holding one of two same-colour objects toward the other's
    # captions (text-query pointing 0.993 against 0.998 at μ = 0.01, seed 1, 10 epochs).
    # λ = 10: at λ = 1, 0.07 error against exact values. 20 epochs: recall@1 58% -> 68% and pointing
    # 0.994 -> 0.9985 over 10 (3 seeds; benchmarks/experiments/image_text, docs/results.md).
    "image-text": {"data": "captions", "out": "runs/captions", "epochs": 20, "lam": 10.0, "mu": 0.01},
}
# The classification loss's options, which image-text training does not take.
CLASSIFICATION_ONLY = {
    "stop_grad": False,
    "grad_coalitions": None,
    "target_precision": "auto",
    "sv_scale": "raw",
}

# Fields that define the optimisation schedule: changing them on resume changes the run.
SCHEDULE_FIELDS = ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs")
# Fields of one invocation, not of the run: a resumed run takes them from the command line.
INVOCATION_FIELDS = (
    "out", "resume", "overwrite", "device", "num_workers", "progress", "max_steps", "threads",
)  # fmt: skip
# Ranges of the numeric fields (their types come from the annotations); None passes where allowed.
AT_LEAST_ONE = (
    "img_size", "patch_size", "depth", "embed_dim", "num_heads", "epochs", "batch_size", "num_coalitions",
    "limit_train", "limit_test", "faith_permutations", "max_steps", "threads", "joint_dim",
)  # fmt: skip
AT_LEAST_ZERO = (
    "weight_decay", "warmup_epochs", "clip_grad", "seed", "num_workers", "faith_images", "heatmap_images",
    "skip_nonfinite",
)  # fmt: skip
HINTS = {  # what None means, for the fields that may be None
    **dict.fromkeys(("depth", "embed_dim", "num_heads"), "0 keeps the model's own"),
    **dict.fromkeys(("limit_train", "limit_test"), "leave it out to use every image"),
    "max_steps": "leave it out for no limit",
    "threads": "leave it out for the thread policy",
}
# The types the field annotations name (strings here, by `from __future__ import annotations`).
_TYPES: dict[str, type | tuple[type, ...]] = {
    "int": int, "float": (int, float), "str": str, "bool": bool, "None": type(None),
    # Literal options are strings here; validate() and ShapleyLoss check their values.
    "Head": str, "Sampler": str, "SvScale": str, "Precision": str, "MaskLoss": str, "Task": str,
    "Contrastive": str,
}  # fmt: skip


@dataclass
class TrainConfig:
    """Settings of one run. Defaults: the digits quick start (2 CPU cores, minutes).

    Data and model: ``data`` (``digits``, ``evidence``, a catalog name such as ``cifar10``, or
    ``imagefolder:PATH``), found under ``data_root`` and fetched there with ``download``; the timm
    ``model`` (``arch`` or ``arch.tag``) with ``img_size``/``patch_size`` and the optional size
    overrides ``depth``, ``embed_dim``, ``num_heads`` (None keeps timm's), the Shapley ``head``, and
    the backbone's weights: timm's ``pretrained`` ones (hub or local cache) or a local ``weights`` file.
    Loss: λ = ``lam`` (ℓ_sv), μ = ``mu`` (ℓ_mask), ``num_coalitions`` per image drawn by ``sampler``
    (``shapley``, ``uniform``, ``bernoulli``), in complementary pairs when ``paired``, of which
    ``grad_coalitions`` carry gradients, ``sv_scale`` (ℓ_sv's normaliser: ``raw``, ``relative``, or
    the experimental ``player`` and ``centered``), ``mask_loss`` (``kl``, ``ce`` or None),
    ``stop_grad``, ``target_precision``. Optimisation: AdamW ``lr``,
    ``weight_decay``, ``warmup_epochs`` of linear warm-up then cosine decay, ``clip_grad``.
    Run: ``seed``, ``out`` folder, ``resume`` (continue the run there) or ``overwrite`` (delete it
    and start anew; without either, a folder that holds a run is refused), ``device`` (``auto``,
    ``cuda``, ``cpu``), ``max_steps`` (stop after that many optimiser steps, as a kill would: no
    checkpoint of the partial epoch), ``skip_nonfinite`` (steps with a non-finite loss or gradient
    that are skipped before the run stops; 0 stops it at the first), ``threads`` (torch's intra-op
    threads on the CPU; None: :mod:`shapkern.threads`'s policy, which lets OMP_NUM_THREADS and
    MKL_NUM_THREADS win and takes fewer threads on a busy machine).

    Image-text matching (``task="image-text"``, :meth:`for_task` sets its defaults): a ShapleyCLIP
    whose Φ lies in a ``joint_dim`` space, trained with the ``contrastive`` loss (``softmax`` or
    ``sigmoid``) + λ ℓ_sv + μ ℓ_mask on captioned images (``captions``, ``coco-captions``,
    ``flickr30k``).

    :meth:`validate` checks every field; the Trainer calls it before it reads or writes anything.
    """

    data: str = "digits"
    model: str = "vit_tiny_patch16_224"
    img_size: int = 32
    patch_size: int = 8
    depth: int | None = 3
    embed_dim: int | None = 64
    num_heads: int | None = 2
    head: Head = "linear"
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
    sampler: Sampler = "shapley"  # how coalitions are drawn (SAMPLERS); configs from before it: shapley
    paired: bool = True  # complementary pairs
    grad_coalitions: int | None = None  # of those, the ones with gradients (None: all; M/4 with stop_grad)
    sv_scale: SvScale = "raw"
    target_precision: Precision = "auto"  # fp8: e4m3 GEMMs for the forward-only ℓ_sv targets
    mask_loss: MaskLoss | None = "kl"
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
    skip_nonfinite: int = 0  # > 0 costs a host sync per step (the decision to skip is made on the host)
    overwrite: bool = False
    threads: int | None = None  # CPU intra-op threads; None: shapkern.threads' policy (an invocation field)
    task: Task = "classification"
    joint_dim: int = 64  # image-text: D of the joint embedding space
    contrastive: Contrastive = "softmax"  # image-text: CLIP's softmax or SigLIP's sigmoid loss

    @classmethod
    def for_task(cls, task: Task = "classification", **fields) -> TrainConfig:
        """A config of ``task`` with its defaults (TASK_DEFAULTS) for the fields not given."""
        if task not in TASKS:
            raise ValueError(f"--task must be one of {TASKS}, got {task!r}")
        return cls(**{**TASK_DEFAULTS[task], **fields, "task": task})

    def __post_init__(self):
        for name in ("out", "weights", "data_root"):  # paths are stored as str: the safe loader reads them
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))

    @classmethod
    def from_dict(cls, record: dict) -> TrainConfig:
        """A config from a checkpoint's record; keys this version does not know are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in record.items() if k in names}
        for name in ("limit_train", "limit_test"):  # before validation, 0 meant every image
            if fields.get(name) == 0:
                fields[name] = None
        return cls(**fields)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """ValueError naming the flag, for a field of the wrong type or out of range, or a combination
        the model or the loss cannot take. Reads nothing."""
        for f in dataclasses.fields(self):
            _check_field(f.name, str(f.type), getattr(self, f.name))
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr!r}")
        if self.seed >= 2**32:
            raise ValueError(f"--seed must be below 2**32 (numpy's seeds), got {self.seed}")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"--patch-size {self.patch_size} does not divide --img-size {self.img_size}: the patches "
                "must tile the image"
            )
        if self.embed_dim is not None and self.num_heads is not None and self.embed_dim % self.num_heads:
            raise ValueError(
                f"--num-heads {self.num_heads} does not divide --embed-dim {self.embed_dim}: every head "
                "gets embed_dim / num_heads channels"
            )
        choices_of = (("head", HEADS), ("device", DEVICES), ("sampler", SAMPLERS), ("task", TASKS))
        for name, choices in (*choices_of, ("contrastive", CONTRASTIVES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{_flag(name)} must be one of {choices}, got {getattr(self, name)!r}")
        for first, second in (("weights", "pretrained"), ("resume", "overwrite")):
            if getattr(self, first) and getattr(self, second):
                raise ValueError(f"give {_flag(first)} or {_flag(second)}, not both")
        if self.paired and self.num_coalitions % 2:
            raise ValueError(
                f"--num-coalitions {self.num_coalitions}: num_coalitions must be a positive int (even with "
                "--paired, which draws complementary pairs); --no-paired draws unpaired coalitions"
            )
        if self.task == "image-text":
            self._validate_image_text()
        else:
            ShapleyLoss(**self.loss_settings())  # checks λ, μ, the graded coalitions and their options

    def _validate_image_text(self) -> None:
        for name, default in CLASSIFICATION_ONLY.items():
            if getattr(self, name) != default:
                raise ValueError(f"{_flag(name)} applies to --task classification, not image-text")
        ContrastiveLoss(self.lam, self.mu, contrastive=self.contrastive, mask_loss=self.mask_loss)

    def loss_settings(self) -> dict:
        """The ShapleyLoss keywords of this config, ``grad_coalitions`` resolved for its coalitions
        (ValueError when they cannot take it)."""
        graded = graded_coalitions(
            self.num_coalitions,
            paired=self.paired,
            stop_grad=self.stop_grad,
            grad_coalitions=self.grad_coalitions,
            target_precision=self.target_precision,
        )
        return {
            "lam": self.lam,
            "mu": self.mu,
            "stop_grad": self.stop_grad,
            "mask_loss": self.mask_loss,
            "sv_scale": self.sv_scale,
            "grad_coalitions": graded,
            "target_precision": self.target_precision,
        }

    def coalition_sampler(self) -> CoalitionSampler:
        """The coalitions of this run, seeded per sample by ``seed``."""
        return CoalitionSampler(self.num_coalitions, self.sampler, self.paired, self.seed)

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

    Without a checkpoint, ``cfg`` is returned unchanged (the run starts fresh); with checkpoints that
    all fail to load, CheckpointError (see ``checkpoint_to_resume``, which the Trainer uses too).
    """
    saved = checkpoint_to_resume(cfg.out).state
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


def _check_field(name: str, annotation: str, value) -> None:
    """ValueError naming the flag of field ``name`` when ``value`` is not of the types its
    ``annotation`` names, not finite, empty, or below its range (AT_LEAST_ONE, AT_LEAST_ZERO)."""
    kinds = tuple(_TYPES[k] for k in annotation.split(" | "))
    is_bool = isinstance(value, bool)
    if not isinstance(value, kinds) or (is_bool and bool not in kinds):
        raise ValueError(f"{_flag(name)} must be {annotation.replace(' | ', ' or ')}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{_flag(name)} must be a finite number, got {value!r}")
    if isinstance(value, str) and not value:
        raise ValueError(f"{_flag(name)} must not be empty")
    for names, low in ((AT_LEAST_ONE, 1), (AT_LEAST_ZERO, 0)):
        if name in names and isinstance(value, (int, float)) and not is_bool and value < low:
            hint = f" ({HINTS[name]})" if name in HINTS else ""
            raise ValueError(f"{_flag(name)} must be at least {low}{hint}, got {value!r}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
