"""``shapkern train``: train a self-explaining ViT, resume it, and report what was written where."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import time

from shapkern.checkpoint import CHECKPOINT, PREVIOUS_CHECKPOINT
from shapkern.coalitions import SAMPLERS
from shapkern.data import CAPTION_DATASETS, DATASETS
from shapkern.engine import PRECISIONS
from shapkern.models import CONTRASTIVES, HEADS, native_input
from shapkern.runlock import FolderLock
from shapkern.training import (
    DEVICES,
    HEATMAPS,
    MASK_LOSSES,
    METRICS,
    SV_SCALES,
    TASKS,
    TrainConfig,
    metric_labels,
    resumed_config,
    train,
)

__all__ = ["add_parser", "run"]

# (field of TrainConfig, help, choices). Types and defaults come from TrainConfig.
ARGS = (
    (
        "task",
        "classification (a self-explaining ViT), or image-text (a self-explaining image-text model on "
        "captioned images; its defaults: --data captions --out runs/captions --epochs 20 --lam 10 --mu 0.01)",
        TASKS,
    ),
    (
        "data",
        f"{', '.join(DATASETS)} (the named ones through torchvision, under --data-root); image-text: "
        f"{', '.join(CAPTION_DATASETS)}",
        None,
    ),
    ("data_root", "folder holding the named datasets (--download fetches a missing one there)", None),
    ("model", "timm ViT, arch or arch.tag (e.g. vit_small_patch16_224.augreg_in21k_ft_in1k)", None),
    ("img_size", "input size in pixels", None),
    ("patch_size", "patch size in pixels; must divide the image size", None),
    ("depth", "backbone depth override (0: the timm model's own; the default makes a 3-block ViT)", None),
    ("embed_dim", "backbone width override (0: the model's own)", None),
    ("num_heads", "backbone heads override (0: the model's own)", None),
    ("head", "Shapley head: linear, or block (one extra attention block, as in ViT-Shapley)", HEADS),
    ("weights", "local backbone weights (.pth, .pt or .safetensors), instead of --pretrained", None),
    ("epochs", "training epochs", None),
    ("batch_size", "global batch size (split over torchrun processes)", None),
    ("lr", "peak learning rate (AdamW)", None),
    ("weight_decay", "AdamW weight decay", None),
    ("warmup_epochs", "linear warm-up before the cosine decay", None),
    ("clip_grad", "gradient norm clipping (0: off)", None),
    ("lam", "λ, weight of the Shapley loss ℓ_sv", None),
    ("mu", "μ, weight of the masked-input loss ℓ_mask", None),
    ("num_coalitions", "coalitions per image and step (even with --paired)", None),
    (
        "sampler",
        "how coalitions are drawn: shapley (sizes from the Shapley kernel), uniform (uniform sizes), "
        "bernoulli (each patch kept with probability 1/2)",
        SAMPLERS,
    ),
    (
        "grad_coalitions",
        "of those, how many carry gradients (default all; M/4 with --stop-grad, which the rest need: "
        "they run forward-only)",
        None,
    ),
    (
        "sv_scale",
        "ℓ_sv's normaliser: raw squared error, relative to sg(‖f(x)‖²) + 1, or (experimental) to "
        "sg(‖Φ(x)‖²)/N (player) or the same with Φ centred over classes (centered)",
        SV_SCALES,
    ),
    ("target_precision", "forward-only ℓ_sv targets in the model's dtype, or e4m3 GEMMs", PRECISIONS),
    ("joint_dim", "image-text: dimensions of the joint image-text embedding space", None),
    ("contrastive", "image-text: CLIP's softmax loss or SigLIP's sigmoid loss", CONTRASTIVES),
    ("mask_loss", "ℓ_mask", tuple("none" if m is None else m for m in MASK_LOSSES)),
    ("seed", "random seed; CPU runs with the same seed are bitwise identical", None),
    ("out", "run folder: checkpoint.pt, checkpoint.prev.pt, metrics.jsonl, explanations.png", None),
    ("device", "where to train", DEVICES),
    ("num_workers", "data loader workers", None),
    (
        "threads",
        "torch's threads on the CPU; default: the cores this process may use, fewer on a busy machine "
        "(1-minute load average), unless OMP_NUM_THREADS or MKL_NUM_THREADS is set. Not part of the run: "
        "results agree across counts up to rounding, bitwise at the same count",
        None,
    ),
    ("limit_train", "use only the first n training images", None),
    ("limit_test", "use only the first n test images", None),
    ("faith_images", "test images for the per-epoch faithfulness figure (0: off)", None),
    ("heatmap_images", "test images in the explanation grid (0: none)", None),
    ("max_steps", "stop after this many optimiser steps (smoke tests)", None),
    (
        "skip_nonfinite",
        "steps with a non-finite loss or gradient to skip (update not applied) before the run stops; 0 "
        "stops it at the first, before anything of its epoch is written. Above 0: a host sync per step",
        None,
    ),
)
OPTIONAL_INT = (
    "depth",
    "embed_dim",
    "num_heads",
    "grad_coalitions",
    "limit_train",
    "limit_test",
    "max_steps",
    "threads",
)
FLAGS = (  # booleans as --x / --no-x
    (
        "resume",
        "continue the run in --out from its newest good checkpoint, with its settings (flags given "
        "here override them); starts fresh when --out has no checkpoint yet, and stops when its "
        "checkpoints cannot be read",
    ),
    (
        "overwrite",
        "delete the run in --out (checkpoints, metrics.jsonl, explanations.png) and start a new one; "
        "without it or --resume, a folder that holds a run is refused",
    ),
    (
        "stop_grad",
        "stop gradients through the ℓ_sv target v_x(S) (the earlier form, which loses accuracy at λ ≥ 1; "
        "then --grad-coalitions defaults to M/4 and --target-precision fp8 applies)",
    ),
    ("paired", "draw coalitions in complementary pairs (S and its complement)"),
    ("progress", "show progress (a bar on a terminal, periodic lines in a log)"),
    ("skip_bad_images", "imagefolder: skip unreadable image files (counted in the log) instead of failing"),
    (
        "pretrained",
        "timm's pretrained weights for --model, from the Hugging Face hub or its local cache "
        "(HF_HUB_OFFLINE=1: cache only); with it or --weights, the size flags default to the model's own",
    ),
    ("download", "download a named dataset into --data-root when it is not there"),
)
# Pretrained weights fix the architecture: without these flags, a run with --pretrained or --weights
# takes the model's own depth, width, heads, image size and patch size (not the digits defaults).
NATIVE = ("depth", "embed_dim", "num_heads", "img_size", "patch_size")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``shapkern train``; flags not given on the command line stay out of the namespace, so a
    resumed run can tell them apart from its saved settings."""
    parser = subparsers.add_parser(
        "train",
        help="train a self-explaining ViT",
        description="Train a self-explaining ViT: Φ(x) per patch, f(x) = Σ Φ, L = ℓ_cls + λ ℓ_sv + μ ℓ_mask. "
        "With no arguments: digits on the CPU in minutes. Multi-process: torchrun --nproc-per-node K "
        "-m shapkern train ...",
        argument_default=argparse.SUPPRESS,
    )
    defaults = TrainConfig()
    for name, text, choices in ARGS:
        default = getattr(defaults, name)
        kind = int if name in OPTIONAL_INT else (str if default is None else type(default))
        shown = "none" if default is None else default
        parser.add_argument(
            "--" + name.replace("_", "-"), type=kind, choices=choices, help=f"{text} (default: {shown})"
        )
    for name, text in FLAGS:
        parser.add_argument(
            "--" + name.replace("_", "-"),
            action=argparse.BooleanOptionalAction,
            help=f"{text} (default: {'on' if getattr(defaults, name) else 'off'})",
        )
    parser.set_defaults(func=run)
    return parser


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, set[str]]:
    """The TrainConfig of parsed arguments, and the fields given explicitly (see NATIVE for what
    --pretrained and --weights change)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields}
    for name in ("depth", "embed_dim", "num_heads"):
        if given.get(name) == 0:
            given[name] = None
    if given.get("mask_loss") == "none":
        given["mask_loss"] = None
    explicit = set(given)
    if given.get("pretrained") or given.get("weights"):
        img_size, patch_size = native_input(given.get("model", TrainConfig.model))
        given = {**dict(zip(NATIVE, (None, None, None, img_size, patch_size), strict=True)), **given}
    return TrainConfig.for_task(**given), explicit


def _summary(cfg: TrainConfig, record: dict, seconds: float) -> str:
    lines = [f"shapkern train: done in {seconds:.0f} s ({seconds / 60:.1f} min)"]
    formats = {
        "test_acc": "{:.2%}",
        "test_r1_i2t": "{:.2%}",
        "test_r1_t2i": "{:.2%}",
        "test_sv": "{:.4f}",
    }  # the other evaluators' metrics: {:.3f}
    shown = [(label, key, formats.get(key, "{:.3f}")) for key, label in metric_labels(cfg).items()]
    shown += [("training loss", "train_loss", "{:.4f}"), ("images/s", "images_per_s", "{:.0f}")]
    shown += [("threads", "threads", "{}")]
    width = max(len(label) for label, _, _ in shown)
    lines += [f"  {label:<{width}}  {fmt.format(record[key])}" for label, key, fmt in shown if key in record]
    written = [
        name
        for name in (CHECKPOINT, PREVIOUS_CHECKPOINT, METRICS, HEATMAPS)
        if os.path.exists(os.path.join(cfg.out, name))
    ]
    lines.append(f"  written to {cfg.out}/: " + ", ".join(written))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Handler of ``shapkern train``. The settings are checked before anything is read or written;
    rank 0 holds the --out folder's lock from before the checkpoint is read until the end."""
    cfg, explicit = config_from_args(args)
    if not cfg.resume:
        cfg.validate()  # a resumed run's settings are known (and checked) once its checkpoint is read
    main_rank = int(os.environ.get("RANK", "0")) == 0
    with FolderLock(cfg.out) if main_rank else contextlib.nullcontext():
        if cfg.resume:
            cfg, notes = resumed_config(cfg, explicit)
            for note in notes:
                print(f"resume: {note}", flush=True)
        start = time.perf_counter()
        record = train(cfg)
    if record and main_rank:
        print(_summary(cfg, record, time.perf_counter() - start), flush=True)
    return 0
