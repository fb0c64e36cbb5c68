"""The output store of a dataset's explanations: shards of safetensors files and a manifest.

A folder holds ``manifest.json`` (the settings, their fingerprint, versions, and once the run is
complete each shard's SHA-256), ``shard-NNNNN.safetensors`` (images [S·k, S·(k+1)) of the split,
S the shard size) and, when complete, ``metrics.json`` and ``metrics.png``. A shard holds:

| tensor | shape | dtype | what |
|---|---|---|---|
| ``values`` | (n, N, K_t) | float32 | φ: patch n (row-major on the grid), target column |
| ``image_ids`` | (n,) | int64 | the image's index in the split |
| ``targets`` | (n, K_t) | int64 | the class of each column |
| ``labels`` | (n,) | int64 | the image's true class |
| ``base``, ``full`` | (n, K_t) | float32 | v(∅) and v(N) |
| ``std_error`` | (n, N, K_t) | float32 | standard errors (methods that have them) |
| ``evaluations`` | (n,) | int64 | coalitions evaluated for the image |
| ``insertion``, ``deletion`` | (n, N + 1) | float32 | insertion and deletion curves of the metric column |

and, in the safetensors metadata (one key, ``shapkern``, canonical JSON), the format, the settings'
fingerprint, the shard's index, the image names and a SHA-256 of the tensors. Shards are written to
a temporary file then renamed (:func:`~shapkern.files.atomic_write`), and checked when read: a
truncated, corrupt or foreign file is a :class:`ShardError`, never data.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from shapkern.files import atomic_write

__all__ = [
    "FORMAT",
    "MANIFEST",
    "METRICS",
    "METRICS_PLOT",
    "STORE_FILES",
    "Explanations",
    "ForeignShardError",
    "ShardError",
    "fingerprint",
    "load_explanations",
    "read_manifest",
    "read_shard",
    "read_shards",
    "shard_name",
    "store_files",
    "write_json",
    "write_shard",
]

FORMAT = "shapkern-explanations-1"
MANIFEST = "manifest.json"
METRICS = "metrics.json"
METRICS_PLOT = "metrics.png"
SHARD = re.compile(r"shard-\d{5,}\.safetensors")
STORE_FILES = ("shard-NNNNN.safetensors", MANIFEST, METRICS, METRICS_PLOT)  # what a store holds, for messages
TENSORS = ("values", "image_ids", "targets", "labels", "base", "full", "evaluations", "insertion", "deletion")


class ShardError(ValueError):
    """A shard file that cannot be used: truncated, corrupt, or holding another shard."""


class ForeignShardError(ShardError):
    """A sound shard made with other settings (another fingerprint)."""


def shard_name(index: int) -> str:
    """The file of shard ``index`` (matches :data:`SHARD`)."""
    return f"shard-{index:05d}.safetensors"


def store_files(folder: Path) -> list[Path]:
    """The files of a store in ``folder``: what ``overwrite`` removes."""
    names = (MANIFEST, METRICS, METRICS_PLOT)
    return sorted(p for p in folder.iterdir() if p.is_file() and (p.name in names or SHARD.fullmatch(p.name)))


def fingerprint(record: object) -> str:
    """SHA-256 of the canonical JSON of ``record`` (the settings that decide the values, a list of names)."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_shard(
    path: Path, index: int, tensors: dict[str, torch.Tensor], *, sources: list[str], key: str
) -> None:
    """Write one shard atomically: CPU tensors, the image names, the settings' fingerprint ``key``."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    meta = {
        "format": FORMAT,
        "fingerprint": key,
        "shard": index,
        "sources": sources,
        "sha256": _checksum(tensors),
    }
    metadata = {"shapkern": json.dumps(meta, sort_keys=True)}  # one key: safetensors orders keys at random
    atomic_write(str(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_shard(path: Path, *, key: str | None = None, index: int | None = None) -> tuple[dict, dict]:
    """(tensors, metadata) of a shard; ShardError when the file is damaged, was made with other
    settings (fingerprint ``key``) or holds another shard than ``index``. The metadata has the
    image names (``sources``) and the tensors' SHA-256 (``sha256``)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["shapkern"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
        if not isinstance(meta, dict):
            raise ValueError(f"its metadata is {type(meta).__name__}, not a record")
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise ShardError(f"{path.name} is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    if meta.get("format") != FORMAT:
        raise ShardError(f"{path.name} is not a shard of format {FORMAT} (it says {meta.get('format')!r})")
    if _checksum(tensors) != meta.get("sha256"):
        raise ShardError(f"{path.name} is corrupt: its tensors do not match their SHA-256")
    if key is not None and meta.get("fingerprint") != key:
        raise ForeignShardError(
            f"{path.name} was made with other settings (fingerprint {meta.get('fingerprint')})"
        )
    if index is not None and meta.get("shard") != index:
        raise ShardError(f"{path.name} holds shard {meta.get('shard')}, not {index}")
    return tensors, meta


def write_json(path: Path, record: dict) -> None:
    """Write a JSON file atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(json.dumps(record, indent=2) + "\n")

    atomic_write(str(path), write)


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a store, or None when there is none; ValueError when it is damaged."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is damaged ({exc}); pass --overwrite to start the store again") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a manifest of format {FORMAT} (it says {manifest.get('format')!r})")
    return manifest


@dataclass
class Explanations:
    """A complete store, read back: every tensor of the shards (see the module), concatenated in
    image order; ``std_error`` is None for methods without standard errors.

    Attributes:
        sources: the image names. manifest: the manifest. metrics: ``metrics.json`` or None.
    """

    values: torch.Tensor
    image_ids: torch.Tensor
    targets: torch.Tensor
    labels: torch.Tensor
    base: torch.Tensor
    full: torch.Tensor
    std_error: torch.Tensor | None
    evaluations: torch.Tensor
    insertion: torch.Tensor
    deletion: torch.Tensor
    sources: list[str]
    manifest: dict
    metrics: dict | None = None

    @classmethod
    def from_shards(cls, tensors: dict, sources: list[str], manifest: dict, metrics: dict | None):
        """From :func:`read_shards`'s tensors and names."""
        return cls(
            **{name: tensors[name] for name in TENSORS},
            std_error=tensors.get("std_error"),
            sources=sources,
            manifest=manifest,
            metrics=metrics,
        )


def read_shards(folder: Path, manifest: dict) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Every shard of a store, checked (and, once the manifest lists them, against its SHA-256s),
    concatenated in image order: (tensors, image names, each shard's SHA-256)."""
    listed = manifest.get("shards") or []
    parts, sources, checksums = [], [], []
    for index in range(manifest["num_shards"]):
        path = folder / shard_name(index)
        if not path.exists():
            raise ShardError(f"{path} is missing: resume the run to compute it")
        tensors, meta = read_shard(path, key=manifest["fingerprint"], index=index)
        if listed and listed[index]["sha256"] != meta["sha256"]:
            raise ShardError(f"{path} is not the shard the manifest lists (another SHA-256)")
        parts.append(tensors)
        sources += meta["sources"]
        checksums.append(meta["sha256"])
    names = parts[0].keys() if parts else ()
    return {name: torch.cat([p[name] for p in parts]) for name in names}, sources, checksums


def load_explanations(folder: str | os.PathLike) -> Explanations:
    """Read a complete store written by :func:`~shapkern.explainers.explain_dataset` (``shapkern
    explain --data ...``). Raises ValueError for a folder without a store, an unfinished run, or a
    damaged, missing or foreign shard."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise ValueError(f"{folder} holds no explanations ({MANIFEST} not found)")
    if not manifest.get("complete"):
        raise ValueError(
            f"{folder}: the run that writes it has not finished; resume it with the same command"
        )
    tensors, sources, _ = read_shards(folder, manifest)
    metrics = folder / METRICS
    return Explanations.from_shards(
        tensors, sources, manifest, json.loads(metrics.read_text()) if metrics.exists() else None
    )
