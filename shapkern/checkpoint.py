"""Checkpoint files: safe loading, atomic rotating saves, and RNG state that survives both.

- Loading never runs code: every checkpoint is read with ``torch.load(weights_only=True)``, so
  only tensors, numbers, strings and containers come back. A file that holds arbitrary Python
  objects is refused with an error that says so (never with advice to load it unsafely).
- Loading verifies checksums: a checkpoint is a zip archive whose every entry carries a CRC-32 of
  its bytes (torch.save writes them; :func:`save_checkpoint` makes sure it does). They are checked
  before anything is unpickled, so a flipped bit in a tensor is a corrupt file, not NaN logits.
  Entries written without one (a CRC of 0: torch's ``compute_crc32`` switched off) and files in
  the pre-zip format of torch < 1.6 load unverified.
- The file is read on the CPU first: an error there means a damaged file (CheckpointError); moving
  it to ``map_location`` afterwards raises the device's own error (out of memory, no such device).
- Saving is atomic and keeps the previous good file: the new state goes to a temporary file in
  the same folder, is flushed to disk (file and folder fsync), then ``checkpoint.pt`` becomes
  ``checkpoint.prev.pt`` and the temporary file becomes ``checkpoint.pt``. A kill at any moment
  leaves at least one complete checkpoint; :func:`newest_checkpoint` resumes from the newest one
  that loads and reports the ones it skipped, and :func:`checkpoint_to_resume` refuses a folder
  whose checkpoints all fail. A failed write (a full disk) removes its temporary file, replaces
  nothing and names the path and the cause.
- RNG states (torch, CUDA, numpy, Python) are stored as tensors and plain numbers, which the
  safe loader reads, and restore bit-exactly.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch

# The atomic writes live in shapkern.files; atomic_write, clean_temporary_files and reported_write
# stay importable from here, where the training code finds them with the checkpoint files.
from shapkern.files import atomic_write, clean_temporary_files, fsync_dir, reported_write, write_synced

__all__ = [
    "CHECKPOINT",
    "PREVIOUS_CHECKPOINT",
    "CheckpointError",
    "LoadedCheckpoint",
    "atomic_write",
    "checkpoint_to_resume",
    "clean_temporary_files",
    "load_checkpoint",
    "newest_checkpoint",
    "reported_write",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: corrupt, truncated, unsafe or of another kind."""


def save_checkpoint(state: dict, folder: str) -> str:
    """Atomically write ``state`` as ``folder/checkpoint.pt``, keeping the last one as
    ``checkpoint.prev.pt``. Returns the path written."""
    path = os.path.join(folder, CHECKPOINT)
    tmp = write_synced(path, lambda p: _save_with_checksums(state, p))
    if os.path.exists(path):
        os.replace(path, os.path.join(folder, PREVIOUS_CHECKPOINT))
    os.replace(tmp, path)
    fsync_dir(os.path.abspath(folder))
    return path


def _crc32_switch():
    """torch.save's settings holding ``compute_crc32``, or None for a torch without the switch (which
    always computes the checksums)."""
    try:
        from torch.utils.serialization import config
    except ImportError:
        return None
    return config.save


def _save_with_checksums(state: dict, path: str) -> None:
    """torch.save with the CRC-32 of every archive entry computed (torch can be told to skip them)."""
    switch = _crc32_switch()
    if switch is None:
        torch.save(state, path)
        return
    previous, switch.compute_crc32 = switch.compute_crc32, True
    try:
        torch.save(state, path)
    finally:
        switch.compute_crc32 = previous


def _verify_checksums(path: str) -> None:
    """Check the CRC-32 of every entry of the zip archive at ``path`` against its bytes."""
    try:
        with zipfile.ZipFile(path) as archive:
            for entry in archive.infolist():
                if entry.CRC == 0:  # not recorded (torch's compute_crc32 off): cannot be verified
                    continue
                with archive.open(entry) as data:  # raises BadZipFile at the end on a mismatch
                    while data.read(1 << 24):
                        pass
    except zipfile.BadZipFile as exc:
        if "CRC" in str(exc):
            raise CheckpointError(
                f"checkpoint {path} is corrupt: the CRC-32 checksum of its entry "
                f"{str(exc).split('file ')[-1]} does not match the data (a damaged copy or disk)"
            ) from None
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {exc}") from None


def _loader_reason(exc: Exception) -> str:
    """What the safe loader objected to, without PyTorch's advice to load the file unsafely."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    reason = " ".join(text.split())
    if "weights_only" in reason:
        return f"{type(exc).__name__} in the safe loader"
    return f"{type(exc).__name__}: {reason}"


def _safe_load(path: str, head: bytes):
    """torch.load(weights_only=True) on the CPU; CheckpointError for a file that is not a usable
    checkpoint. Memory and read errors are raised as they are: they say nothing about the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (MemoryError, OSError):
        raise
    except pickle.UnpicklingError as exc:
        if "unsupported global" in str(exc).lower():  # a class or function the file asks to build
            raise CheckpointError(
                f"refused to load {path}: it holds Python objects that only torch.load(weights_only=False) "
                "can build, and building them can execute arbitrary code. shapkern checkpoints hold only "
                "tensors and plain values; load a file from an untrusted source only after inspecting it."
            ) from None
        reason = _loader_reason(exc)
    except Exception as exc:  # a damaged file fails deep inside the unpickler with many types
        reason = _loader_reason(exc)
    if head.startswith(_ZIP_MAGIC):
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {reason}")
    raise CheckpointError(  # not even the pickle of torch < 1.6 loads
        f"{path} is not a shapkern checkpoint, or is truncated or corrupt: torch.save writes a zip "
        f"archive, and this file begins with {head!r}"
    )


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return type(obj)((k, _to_device(v, device)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read a checkpoint safely (``weights_only=True``: no code in the file can run), verifying its
    checksums, on the CPU, then move its tensors to ``map_location`` (a device).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is empty, truncated or corrupt (a checksum mismatch included), is
            not a torch file or not a dict, or holds Python objects that only the unsafe loader
            could build (refused, since loading them can run code).
        Other errors as they are: reading the file (OSError), host memory (MemoryError), moving it
            to ``map_location`` (e.g. torch.OutOfMemoryError); none of them means the file is bad.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): a save was cut off")
    with open(path, "rb") as f:
        head = f.read(24)
    if head.startswith(_ZIP_MAGIC):
        _verify_checksums(path)
    state = _safe_load(path, head)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a shapkern checkpoint (it holds a {type(state).__name__})")
    if torch.device(map_location).type != "cpu":
        state = _to_device(state, map_location)
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
    unusable (``validate(state)`` may raise CheckpointError to reject one). Only CheckpointError
    skips a file; other errors (device, memory, reading) are raised as they are."""
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


def checkpoint_to_resume(folder: str, map_location="cpu") -> LoadedCheckpoint:
    """The checkpoint a resumed run continues from (:func:`newest_checkpoint`).

    A folder with no checkpoint file gives ``state`` None: a new run may start there. A folder whose
    checkpoint files all fail raises CheckpointError naming each file and why, and nothing in it is
    touched: a resumed run never starts over a run it cannot read.
    """
    loaded = newest_checkpoint(folder, map_location)
    if loaded.state is None and loaded.skipped:
        reasons = "".join(f"\n  {path}: {why}" for path, why in loaded.skipped)
        raise CheckpointError(
            f"cannot resume the run in {folder}: none of its checkpoints loads, and nothing there was "
            f"changed:{reasons}\nRestore a good copy, or start a new run with --overwrite (which deletes "
            "them) or another --out."
        )
    return loaded


def rng_state() -> dict:
    """The torch, CUDA, numpy and Python RNG states as tensors and numbers (safe-loader readable)."""
    legacy = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    kind, keys, pos, has_gauss, cached = legacy
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
