"""``shapkern explain --data NAME`` without ``--num-images``: a whole dataset split into a resumable
store of shards, by one process or many (``torchrun --nproc-per-node K -m shapkern explain ...``).

    shapkern explain --model vit_base_patch16_224 --pretrained --data imagenette --limit 1024 --out expl/
    torchrun --nproc-per-node 2 -m shapkern explain --checkpoint run/checkpoint.pt --data digits --out expl/

See :mod:`shapkern.explainers.dataset` (what is computed, how it resumes) and
:mod:`shapkern.explainers.store` (the files).
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch

from shapkern.data import DATASETS, DEFAULT_DATA_ROOT, SPLITS
from shapkern.explainers import DEFAULT_SHARD_SIZE, STORE_FILES, explain_dataset, load_model
from shapkern.runlock import FolderLock
from shapkern.training import Distributed

__all__ = ["STORE_FLAGS", "add_store_arguments", "model_of", "not_a_file", "parse_target", "run_store"]

STORE_FLAGS = ("split", "limit", "shard_size")  # given without the store: an error, not ignored


def add_store_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of the dataset store (their defaults are None: the picture mode refuses them)."""
    group = p.add_argument_group(
        "a whole dataset into a store (--data without --num-images)",
        f"writes {', '.join(STORE_FILES)}; a killed run resumes where it stopped when run again with the "
        "same settings; under torchrun each process explains its share. Datasets: " + ", ".join(DATASETS),
    )
    group.add_argument(
        "--split", choices=SPLITS, default=None, help="the split explained (test when not given)"
    )
    group.add_argument("--limit", type=int, default=None, help="explain the split's first LIMIT images only")
    group.add_argument(
        "--shard-size",
        type=int,
        default=None,
        help=f"images per shard, explained together and written in one file ({DEFAULT_SHARD_SIZE} when "
        "not given); part of the settings a resumed run must repeat",
    )
    group.add_argument(
        "--data-root",
        default=DEFAULT_DATA_ROOT,
        help="where the torchvision datasets (cifar10, ...) live (pictures too)",
    )
    group.add_argument(
        "--download", action="store_true", help="download a missing torchvision dataset (pictures too)"
    )


def not_a_file(path: str) -> Path:
    """``--out`` as a path, a ValueError when it names a file."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {path} is a file, not a folder: name a new or empty folder")
    return out


def parse_target(text: str):
    """``--target``: 'pred', 'label', 'all' or a class index."""
    if text in ("pred", "label", "all"):
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"--target must be 'pred', 'all' or a class index, or 'label' (the true class), got {text!r}"
        ) from None


def model_of(args: argparse.Namespace, device: torch.device):
    """The model that ``--model``/``--checkpoint``, ``--pretrained`` and ``--weights`` name, on
    ``device``: a NamedModel (model, preprocessing, ...)."""
    return load_model(
        args.model,
        checkpoint=args.checkpoint,
        pretrained=args.pretrained,
        weights=args.weights,
        device=device,
    )


def run_store(args: argparse.Namespace) -> int:
    """Explain ``--data`` into the store ``--out``: in every process of a torchrun group, each on
    its own shards; rank 0 takes the folder lock first."""
    not_a_file(args.out)  # before the lock, which creates the folder
    group = Distributed.from_environment(args.device)  # the torchrun group, if any: nccl or gloo
    main, device = group.is_main, group.device
    try:
        with FolderLock(args.out) if main else contextlib.nullcontext():  # before the model loads
            named = model_of(args, device)
            if named.random_weights and main:
                print(f"note: {args.model} has random weights (pass --pretrained or --weights FILE)")
            explain_dataset(named, args.data, out=args.out, **_store_options(args))
    finally:
        group.close()
    return 0


def _store_options(args: argparse.Namespace) -> dict:
    return {
        "split": args.split or "test",
        "limit": args.limit,
        "method": args.method,
        "budget": args.budget,
        "target": parse_target(args.target),
        "tol": args.tol,
        "seed": args.seed,
        "shard_size": DEFAULT_SHARD_SIZE if args.shard_size is None else args.shard_size,
        "coalitions_per_call": args.coalitions_per_call,
        "data_root": args.data_root,
        "download": args.download,
        "overwrite": args.overwrite,
        "progress": args.progress,
    }
