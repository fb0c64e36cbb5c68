"""Loads the compiled extension shapkern._C, or warns once that shapkern uses its PyTorch reference ops."""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from types import ModuleType

import torch


def _advice() -> str:
    """What to run, by where shapkern was imported from."""
    package = Path(__file__).resolve().parents[1]
    if (package.parent / "setup.py").is_file() and not any(package.glob("_C*")):
        return (
            f"shapkern was imported from its source folder {package}, which holds no compiled extension "
            "(Python puts the current directory first on sys.path, so running from the repository root "
            "imports the sources rather than the installed package). Run from another directory, or build "
            "the extension into the sources with `pip install --no-build-isolation -e .`."
        )
    return "Rebuild it against the installed torch with `pip install --no-build-isolation --no-deps .`."


_C: ModuleType | None
try:
    _C = importlib.import_module("shapkern._C")
except (ImportError, OSError) as exc:  # not built, or built against another torch (ABI mismatch)
    _C = None
    _ERROR: str | None = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"shapkern: the compiled extension shapkern._C failed to load ({_ERROR}); shapkern falls back to "
        f"its PyTorch reference ops, which give the same results more slowly. {_advice()}",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    _ERROR = None


def extension_loaded() -> bool:
    """Whether shapkern._C was imported, registering torch.ops.shapkern.*."""
    return _C is not None


def has_cpu_kernels() -> bool:
    """Whether the C++ CPU kernels are available (always built into the extension)."""
    return _C is not None


def has_cuda_kernels() -> bool:
    """Whether the extension was compiled with its CUDA kernels."""
    return _C is not None and bool(_C.cuda_compiled())


def extension_error() -> str | None:
    """Why the extension failed to load, or None if it loaded."""
    return _ERROR


def has_kernels(device: torch.device) -> bool:
    """Whether torch.ops.shapkern.* has kernels for tensors on `device`."""
    if device.type == "cpu":
        return has_cpu_kernels()
    return device.type == "cuda" and has_cuda_kernels()
