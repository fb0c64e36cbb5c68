"""Report what shapkern runs on: ``python -m shapkern.env``."""

from __future__ import annotations

import os
import platform
import sys

import torch


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def triton_mode() -> str:
    """'interpreter' (TRITON_INTERPRET=1), 'native' (a CUDA GPU), or why Triton kernels do not run."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "interpreter (TRITON_INTERPRET=1)"
    if _version("triton") == "not installed":
        return "unavailable (triton not installed): PyTorch reference ops"
    if torch.cuda.is_available():
        return "native (CUDA)"
    return "not used (no CUDA GPU): PyTorch reference ops on the CPU"


def environment() -> dict[str, str]:
    """Versions, extension kernels, Triton mode and GPU, as printable strings."""
    from shapkern import __version__
    from shapkern.ops import _extension

    info = {
        "shapkern": __version__,
        "python": platform.python_version(),
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda})",
        "triton": _version("triton"),
        "timm": _version("timm"),
        "extension CPU kernels": "yes" if _extension.has_cpu_kernels() else "no",
        "extension CUDA kernels": "compiled in" if _extension.has_cuda_kernels() else "not compiled in",
        "triton mode": triton_mode(),
    }
    error = _extension.extension_error()
    if error:
        info["extension error"] = error
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        info["gpu"] = f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})"
    else:
        info["gpu"] = "none"
    return info


def main() -> None:
    info = environment()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
