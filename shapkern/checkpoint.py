"""Checkpoint files: safe loading, atomic rotating saves, and RNG state that survives both.

- Loading never runs code: every checkpoint is read with ``torch.load(weights_only=True)``, so
  only tensors, numbers, strings and containers come back. A file that holds arbitrary Python
  objects is refused with an error that says so.
- Saving is atomic and keeps the previous good file: the new state goes to a temporary file in
  the same folder, is flushed to disk (file and folder fsync), then ``checkpoint.pt`` becomes
  ``checkpoint.prev.pt`` and the temporary file becomes ``checkpoint.pt``. A kill at any moment
  leaves at least one complete checkpoint; :func:`newest_checkpoint` resumes from the newest one
  that loads and reports the ones it skipped.
- RNG states (torch, CUDA, numpy, Python) are stored as tensors and plain numbers, which the
  safe loader reads, and restore bit-exactly.
"""

from __future__ import annotations

import glob
import os
import pickle
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "CHECKPOINT",
    "PREVIOUS_CHECKPOINT",
    "CheckpointError",
    "LoadedCheckpoint",
    "atomic_write",
    "clean_temporary_files",
    "load_checkpoint",
    "newest_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
_TMP_MARK = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: corrupt, truncated, unsafe or of another kind."""


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_path(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}{_TMP_MARK}{os.getpid()}")


def _write_synced(path: str, write: Callable[[str], None]) -> str:
    """Write to a temporary file next to ``path`` and fsync it; returns the temporary path."""
    tmp = _temporary_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return tmp


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Write ``path`` through ``write(tmp_path)`` and a rename: a kill leaves the old file or the new."""
    tmp = _write_synced(path, write)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def clean_temporary_files(folder: str) -> list[str]:
    """Remove temporary files that a killed save left in ``folder``; returns their paths."""
    stale = glob.glob(os.path.join(glob.escape(folder), f".*{_TMP_MARK}*"))
    for path in stale:
        os.remove(path)
    return stale


def save_checkpoint(state: dict, folder: str) -> str:
    """Atomically write ``state`` as ``folder/checkpoint.pt``, keeping the last one as
    ``checkpoint.prev.pt``. Returns the path written."""
    path = os.path.join(folder, CHECKPOINT)
    tmp = _write_synced(path, lambda p: torch.save(state, p))
    if os.path.exists(path):
        os.replace(path, os.path.join(folder, PREVIOUS_CHECKPOINT))
    os.replace(tmp, path)
    _fsync_dir(os.path.abspath(folder))
    return path


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read a checkpoint safely (``weights_only=True``): no code in the file can run.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is truncated or corrupt, is not a dict, or holds Python objects
            that only the unsafe loader could build (refused, since loading them can run code).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): a save was cut off")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" in str(exc).lower():  # a class or function the file asks to build
            raise CheckpointError(
                f"refused to load {path}: it holds Python objects that only torch.load(weights_only=False) "
                "can build, and building them can execute arbitrary code. shapkern checkpoints hold only "
                "tensors and plain values; load a file from an untrusted source only after inspecting it."
            ) from None
        raise CheckpointError(f"checkpoint {path} is corrupt: {exc}") from None
    except Exception as exc:  # a damaged file fails deep inside the unpickler with many types
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt: {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a shapkern checkpoint (it holds a {type(state).__name__})")
    return state


@dataclass
class LoadedCheckpoint:
    """The newest usable checkpoint of a folder.

    Attributes:
        state: the loaded dict, or None when the folder has no usable checkpoint.
        path: the file it came from, or None.
        skipped: (path, reason) of every newer file that could not be used.
    """

    state: dict | None
    path: str | None
    skipped: list[tuple[str, str]] = field(default_factory=list)


def newest_checkpoint(
    folder: str, map_location="cpu", validate: Callable[[dict], None] | None = None
) -> LoadedCheckpoint:
    """Load ``checkpoint.pt`` from ``folder``, or ``checkpoint.prev.pt`` when the newer one is
    unusable (``validate(state)`` may raise CheckpointError to reject one)."""
    skipped = []
    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        try:
            state = load_checkpoint(path, map_location)
            if validate is not None:
                validate(state)
        except CheckpointError as exc:
            skipped.append((path, str(exc)))
            continue
        return LoadedCheckpoint(state, path, skipped)
    return LoadedCheckpoint(None, None, skipped)


def rng_state() -> dict:
    """The torch, CUDA, numpy and Python RNG states as tensors and numbers (safe-loader readable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": version,
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu())
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
