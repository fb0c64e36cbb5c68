"""What rank 0 does around a dataset's explanation run (:mod:`~shapkern.explainers.dataset`): before
the shards, check the store against the settings and remove what a killed run left; after them,
check every shard, write the dataset-level metrics (``metrics.json``, ``metrics.png``), mark the
manifest complete and print a summary line."""

from __future__ import annotations

import time

import torch

from shapkern.explainers import store
from shapkern.explainers.metrics import localization
from shapkern.files import atomic_write, clean_temporary_files
from shapkern.progress import duration

__all__ = ["dataset_metrics", "finish_store", "metric_column", "prepare_store"]


def _changed(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The settings that differ, as ``key: old -> new``."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a} -> {b}")
    return out


def prepare_store(run, overwrite: bool) -> tuple[set[int], bool]:
    """Rank 0, before any shard is computed: refuse other settings (unless ``overwrite``), remove
    what a killed run left (temporary files, damaged shards) and write the manifest. Returns the
    shards already done, and whether the store is complete (nothing to do)."""
    old = store.read_manifest(run.out) if not overwrite else None
    if overwrite:
        for path in store.store_files(run.out):
            path.unlink()
    if old is not None and old["fingerprint"] != run.key:
        changes = "; ".join(_changed(old["settings"], run.settings)[:6])
        raise ValueError(
            f"--out {run.out} holds explanations made with other settings ({changes or 'another version'}); "
            "run again with the same settings to resume, name another folder, or pass --overwrite to "
            "replace them"
        )
    clean_temporary_files(str(run.out))
    done = set()
    for index in range(run.num_shards):
        path = run.out / store.shard_name(index)
        if not path.exists():
            continue
        try:
            store.read_shard(path, key=run.key, index=index)
            done.add(index)
        except store.ForeignShardError as exc:
            raise ValueError(f"--out {run.out}: {exc}; pass --overwrite to replace the store") from None
        except store.ShardError as exc:
            print(f"shapkern explain: {exc}: computing it again", flush=True)
            path.unlink()
    complete = bool(old and old.get("complete")) and len(done) == run.num_shards
    if not (complete and (run.out / store.METRICS).exists()):
        store.write_json(run.out / store.MANIFEST, run.manifest(complete=False))
        return done, False
    return done, True


def metric_column(full: torch.Tensor, target) -> torch.Tensor:
    """(n,) the target column the metrics score: the predicted class's with ``target="all"``, else
    the first (the only one for "pred", "label" and a class index)."""
    if target == "all":
        return full.argmax(-1)
    return torch.zeros(full.shape[0], dtype=torch.int64, device=full.device)


def dataset_metrics(tensors: dict, target, masks: torch.Tensor | None) -> dict:
    """Means over the images: insertion and deletion AUC and curves (the softmax probability of
    the scored class), the largest efficiency gap, and localisation where ``masks`` (n, N) exist."""
    values, full, base = tensors["values"].double(), tensors["full"].double(), tensors["base"].double()
    column = metric_column(full, target)
    phi = values.gather(-1, column.view(-1, 1, 1).expand(-1, values.shape[1], 1))[..., 0]
    insertion, deletion = tensors["insertion"].double(), tensors["deletion"].double()
    dx = 1.0 / (insertion.shape[1] - 1)
    record = {
        "images": values.shape[0],
        "scored": "softmax probability of the predicted class"
        if target == "all"
        else "softmax probability of the target class",
        "insertion_auc": float(torch.trapezoid(insertion, dx=dx, dim=-1).mean()),
        "deletion_auc": float(torch.trapezoid(deletion, dx=dx, dim=-1).mean()),
        "efficiency_gap_max": float((values.sum(1) - (full - base)).abs().max()),
        "insertion_curve": insertion.mean(0).tolist(),
        "deletion_curve": deletion.mean(0).tolist(),
    }
    if masks is not None:
        record["localization"] = localization(phi, masks)
    return record


def _plot(path, method: str, tensors: dict, metrics: dict) -> None:
    from shapkern.explainers.viz import plot_curves

    fig = plot_curves({method: tensors["insertion"]}, {method: tensors["deletion"]})
    title = f"{metrics['images']} images"
    if "localization" in metrics:
        loc = metrics["localization"]
        title += f"; pointing game {loc['pointing']:.3f}, AUROC {loc['auroc']:.3f}, mIoU {loc['miou']:.3f}"
    fig.suptitle(title, fontsize=9)
    atomic_write(str(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def finish_store(run, done: set[int], *, seconds: float, processes: int) -> store.Explanations:
    """Rank 0, after every process has written its shards: check them all, write the metrics and
    the complete manifest, print the summary; returns the store read back."""
    tensors, sources, checksums = store.read_shards(run.out, run.manifest(complete=False))
    target = run.options["target"]
    masks = run.view.masks(run.grid)
    metrics = dataset_metrics(tensors, target, masks)
    store.write_json(run.out / store.METRICS, metrics)
    _plot(run.out / store.METRICS_PLOT, run.options["method"], tensors, metrics)
    computed = len(run.view) - sum(len(run.shard_range(k)) for k in done)
    record = {
        "processes": processes,
        "device": str(run.device),
        "images_computed": computed,
        "seconds": round(seconds, 3),
        "images_per_s": computed / seconds if seconds > 0 else None,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    shards = [
        {"file": store.shard_name(k), "images": len(run.shard_range(k)), "sha256": checksums[k]}
        for k in range(run.num_shards)
    ]
    manifest = run.manifest(complete=True, shards=shards, run=record)
    store.write_json(run.out / store.MANIFEST, manifest)  # last: the store is complete once it says so
    earlier = f"; {len(run.view) - computed} from an earlier run" if computed < len(run.view) else ""
    rate = f", {record['images_per_s']:.3g} images/s" if computed and seconds > 0 else ""
    where = f"{run.view.name} {run.view.split}"
    local = metrics.get("localization")
    local = f", pointing game {local['pointing']:.3f}, mIoU {local['miou']:.3f}" if local else ""
    print(
        f"shapkern explain: {len(run.view)} images of {where} ({computed} explained by {processes} "
        f"process(es) in {duration(seconds)}{rate}{earlier}), method {run.options['method']}, "
        f"{float(tensors['evaluations'].double().mean()):g} evaluations/image, insertion AUC "
        f"{metrics['insertion_auc']:.3f}, deletion AUC {metrics['deletion_auc']:.3f}{local} -> {run.out}",
        flush=True,
    )
    return store.Explanations.from_shards(tensors, sources, manifest, metrics)
