"""``explain_dataset``: Shapley values of every image of a dataset split, in shards, by any number of
processes, into a resumable store (:mod:`~shapkern.explainers.store`).

- **Shards.** Images [S·k, S·(k+1)) of the split form shard k (S = ``shard_size``): one call of
  :func:`~shapkern.explain` on S images, which the engine runs in packed passes across images and
  coalitions. Under ``torchrun`` (a ``torch.distributed`` process group) of K processes, rank r
  computes the r-th, (r + K)-th, ... of the shards missing when the run starts (so a resumed run
  stays balanced), each process writing its own files; no collective runs but barriers. Rank 0
  holds the folder lock, checks and prepares the store, then writes the manifest, ``metrics.json``
  and ``metrics.png``; every other process checks that its settings are those of rank 0's manifest.
- **Determinism.** A shard's images and seed do not depend on the number of processes or on what
  an earlier run finished, so a run's values equal a one-process run's, bit for bit on the same
  device. Every shard is explained with the same ``seed``: ``kernel``, ``leverage`` and ``bayes``
  evaluate the same coalition design for every image of the run (drawn on the CPU from the seed),
  ``permutation`` draws an image's orderings by its position in its shard, ``exact`` and ``self``
  have no randomness; ``tol`` stops a shard once its largest standard error is below it.
- **Resume.** A shard file is written to a temporary file and renamed, and checked (its SHA-256)
  when read: a killed run leaves whole shards only, and a rerun with the same settings computes the
  missing, corrupt or partial ones and nothing else; a finished run is not recomputed. Other
  settings (model weights, preprocessing, images, method, budget, seed, target, shard size, ...)
  are refused unless ``overwrite``, which removes the store's files first.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sized
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from shapkern.data import DEFAULT_DATA_ROOT, EvidenceDataset, Preprocessing, explain_split
from shapkern.data.views import SplitView
from shapkern.engine import patch_grid
from shapkern.explainers import store
from shapkern.explainers.dataset_run import finish_store, metric_column, prepare_store
from shapkern.explainers.estimators import DEFAULT_COALITIONS_PER_CALL
from shapkern.explainers.explain import explain, resolve_method
from shapkern.explainers.loading import NamedModel, as_named_model
from shapkern.explainers.metrics import insertion_deletion
from shapkern.games import model_game
from shapkern.progress import Progress
from shapkern.runlock import FolderLock

__all__ = ["DEFAULT_SHARD_SIZE", "TARGETS", "explain_dataset"]

DEFAULT_SHARD_SIZE = 64
TARGETS = ("pred", "label", "all")  # or a class index


def _world() -> tuple[int, int]:
    """(rank, processes) of the torch.distributed process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _split(dataset, named: NamedModel, split: str, limit: int | None, root: str, download: bool) -> SplitView:
    """The images to explain: a dataset spec in the model's test view, or a Dataset of items
    (image, label, ...) already preprocessed."""
    if isinstance(dataset, str):
        if named.preprocessing is None:
            print(f"note: no preprocessing given for {named.name}: {dataset}'s own test view")
        return explain_split(
            dataset,
            split=split,
            prep=named.preprocessing,
            size=named.input_size,
            limit=limit,
            root=root,
            download=download,
        )
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a dataset name or a torch Dataset, got {type(dataset).__name__}")
    size = len(cast(Sized, dataset))  # torch's Dataset declares no __len__
    count = size if limit is None else min(limit, size)
    name = type(dataset).__name__
    return SplitView(
        dataset=torch.utils.data.Subset(dataset, range(count)),
        name=name,
        split="given",
        classes=[],
        sources=[f"{name}[{i}]" for i in range(count)],
        _with_masks=dataset if isinstance(dataset, EvidenceDataset) else None,
    )


def _options(*, target, seed: int, coalitions_per_call: int | None, **rest) -> dict:
    """The settings of every shard's explain() call, checked (ValueError)."""
    if isinstance(target, bool) or not (target in TARGETS or isinstance(target, int)):
        raise ValueError(f"target must be one of {TARGETS} or a class index, got {target!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int (the store must be reproducible to resume), got {seed!r}")
    calls = DEFAULT_COALITIONS_PER_CALL if coalitions_per_call is None else coalitions_per_call
    return {**rest, "target": target, "seed": seed, "coalitions_per_call": calls}


class _Run:
    """One explain_dataset call: the model, the images and the settings every shard needs."""

    def __init__(self, named: NamedModel, view: SplitView, out: Path, options: dict, shard_size: int):
        if len(view) == 0:
            raise ValueError(f"{view.name} {view.split} holds no images to explain")
        self.named, self.view, self.out, self.options, self.shard_size = named, view, out, options, shard_size
        self.device = next(named.model.parameters(), torch.empty(0)).device
        self.num_shards = -(-len(view) // shard_size)
        with torch.inference_mode():
            probe = model_game(named.model, self.images(range(1))[0], **self.game_options)
        self.players = probe.players
        self.grid = patch_grid(named.model, self.players)
        method = resolve_method(
            options["method"],
            named.model,
            self.players,
            options["budget"],
            options["tol"],
            mode=options["mode"],
        )
        self.options = options | {"method": method}
        # What decides the values (with the names, which the fingerprint leaves out).
        self.settings: dict[str, Any] = {
            "model": named.record(),
            "data": {
                "name": view.name,
                "split": view.split,
                "images": len(view),
                "sources_sha256": store.fingerprint(view.sources),
            },
            "explain": dict(self.options),
            "shard_size": shard_size,
            "metric_output": "prob",
        }
        unnamed = {
            part: {k: v for k, v in self.settings[part].items() if k != "name"} for part in ("model", "data")
        }
        self.key = store.fingerprint(self.settings | unnamed)  # the same weights and images under other names

    @property
    def game_options(self) -> dict:
        return {k: self.options[k] for k in ("mode", "baseline", "players")}

    def images(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images (n, C, H, W) on the model's device, labels (n,), ids (n,)) of the split's indices."""
        items = [self.view.dataset[i] for i in indices]
        images = torch.stack([torch.as_tensor(item[0]) for item in items]).to(self.device)
        labels = torch.tensor([int(item[1]) for item in items], dtype=torch.int64)
        ids = torch.tensor(
            [int(item[2]) if len(item) > 2 else i for item, i in zip(items, indices, strict=True)]
        )
        return images, labels, ids

    def shard_range(self, index: int) -> range:
        return range(index * self.shard_size, min((index + 1) * self.shard_size, len(self.view)))

    def manifest(self, *, complete: bool, shards: list | None = None, run: dict | None = None) -> dict:
        from shapkern import __version__

        return {
            "format": store.FORMAT,
            "fingerprint": self.key,
            "complete": complete,
            "settings": self.settings,
            "num_images": len(self.view),
            "num_shards": self.num_shards,
            "players": self.players,
            "grid": list(self.grid),
            "classes": self.named.classes,  # of the model's outputs: what targets index
            "data_classes": self.view.classes,  # what labels index
            "values_layout": "values[image] is N x K_t: patch n (row-major on the grid), target column",
            "versions": {"shapkern": __version__, "torch": torch.__version__},
            "shards": shards or [],
            "run": run or {},
        }

    def compute(self, index: int) -> None:
        """Explain shard ``index`` and write it."""
        span = self.shard_range(index)
        images, labels, ids = self.images(span)
        target = self.options["target"]
        opts = {k: v for k, v in self.options.items() if k not in ("target", *self.game_options)}
        att = explain(
            self.named.model,
            images,
            target=labels.to(self.device) if target == "label" else target,
            progress=False,
            **opts,
            **self.game_options,
        )
        column = metric_column(att.full, target)
        phi = att.values.gather(-1, column.view(-1, 1, 1).expand(-1, self.players, 1))[..., 0]
        game = model_game(self.named.model, images, **self.game_options)
        curves = insertion_deletion(game, phi, att.target.gather(-1, column.view(-1, 1))[:, 0])
        tensors = {
            "values": att.values.float(),
            "image_ids": ids,
            "targets": att.target,
            "labels": labels,
            "base": att.base.float(),
            "full": att.full.float(),
            "evaluations": torch.full((len(span),), att.evaluations, dtype=torch.int64),
            "insertion": curves["insertion"].float(),
            "deletion": curves["deletion"].float(),
        }
        if att.std_error is not None:
            tensors["std_error"] = att.std_error.float()
        names = [self.view.sources[i] for i in span]
        store.write_shard(self.out / store.shard_name(index), index, tensors, sources=names, key=self.key)


def explain_dataset(
    model: nn.Module | NamedModel,
    dataset: str | Dataset,
    *,
    out: str | os.PathLike,
    preprocessing: Preprocessing | None = None,
    split: str = "test",
    limit: int | None = None,
    method: str = "auto",
    budget: int | None = None,
    target="pred",
    tol: float | None = None,
    seed: int = 0,
    shard_size: int = DEFAULT_SHARD_SIZE,
    coalitions_per_call: int | None = None,
    mode: str | None = None,
    baseline: str = "zeros",
    players: int | None = None,
    data_root: str = DEFAULT_DATA_ROOT,
    download: bool = False,
    overwrite: bool = False,
    progress: bool = True,
):
    """Explain every image of a dataset split into the store ``out`` (see the module), with the
    dataset-level metrics: insertion and deletion AUC, and pointing game, AUROC and mIoU where the
    data has masks (``metrics.json``, ``metrics.png``). Runs under ``torch.inference_mode()``.

    Args:
        model: a module (timm models bring timm's preprocessing) or a :class:`NamedModel` from
            :func:`~shapkern.explainers.load_model` (a name, a checkpoint).
        dataset: a name of :data:`shapkern.data.DATASETS` (``"digits"``, ``"cifar10"``,
            ``"imagefolder:PATH"``, ...), made in the model's test view, or a torch Dataset of
            preprocessed items ``(image, label[, index])``.
        preprocessing: overrides the model's; without either, the dataset's own test view.
        split, limit: ``"test"`` or ``"train"`` (always in the test view), its first ``limit`` images.
        method, budget, tol, coalitions_per_call, mode, baseline, players: see :func:`~shapkern.explain`.
        target: ``"pred"``, ``"label"`` (the true class), ``"all"`` or a class index.
        seed: an int; every image gets the same coalition design (see the module).
        shard_size: images per shard, explained together.
        data_root, download: where the catalog datasets live, and whether to fetch a missing one.
        overwrite: replace a store made with other settings.

    Returns:
        The store read back (:func:`~shapkern.explainers.load_explanations`) on rank 0, None on
        the other processes of a process group.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    options = _options(
        method=method,
        budget=budget,
        target=target,
        tol=tol,
        seed=seed,
        coalitions_per_call=coalitions_per_call,
        mode=mode,
        baseline=baseline,
        players=players,
    )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: name a new or empty folder")
    named = as_named_model(model, preprocessing)
    view = _split(dataset, named, split, limit, data_root, download)
    return _explain_into(out, named, view, options, shard_size, overwrite=overwrite, progress=progress)


def _explain_into(out: Path, named, view, options: dict, shard_size: int, *, overwrite: bool, progress: bool):
    """Every process: its shards between barriers; rank 0 holds the folder lock, prepares the store
    before and finishes it after."""
    rank, world = _world()
    lock = FolderLock(out) if rank == 0 else None  # rank 0 writes for all (shapkern.runlock)
    try:
        if lock is not None:
            lock.acquire()
        run = _Run(named, view, out, options, shard_size)
        done, complete = prepare_store(run, overwrite) if rank == 0 else (set(), False)
        _barrier(world)
        if rank != 0:
            _check_rank_zeros_settings(run, rank)
        missing = [k for k in range(run.num_shards) if not (run.out / store.shard_name(k)).exists()]
        _barrier(world)  # every process has listed them before any is written
        start = time.perf_counter()
        _compute_shards(run, missing[rank::world], progress=progress and rank == 0)
        _barrier(world)
        if rank != 0:
            return None
        if complete:
            print(f"shapkern explain: {out} already holds these {len(view)} explanations; nothing to do")
            return store.load_explanations(out)
        return finish_store(run, done, seconds=time.perf_counter() - start, processes=world)
    finally:
        if lock is not None:
            lock.release()


def _check_rank_zeros_settings(run: _Run, rank: int) -> None:
    """A process whose settings differ from those rank 0 wrote in the manifest (another model, other
    images) would write shards of another store: a ValueError instead."""
    manifest = store.read_manifest(run.out)
    if manifest is None or manifest["fingerprint"] != run.key:
        theirs = "none" if manifest is None else manifest["fingerprint"][:12]
        raise ValueError(
            f"rank {rank}: its settings (fingerprint {run.key[:12]}) are not rank 0's ({theirs}): every "
            "process must load the same model weights and images with the same options"
        )


def _compute_shards(run: _Run, shards: list[int], *, progress: bool) -> None:
    """Compute and write ``shards``, with a progress bar."""
    bar = Progress(sum(len(run.shard_range(k)) for k in shards), "explain", unit="image", enabled=progress)
    try:
        with torch.inference_mode():
            for index in shards:
                run.compute(index)
                bar.update(len(run.shard_range(index)))
    finally:
        bar.close()
        sys.stdout.flush()
