"""What a result was measured on: :func:`environment` (hardware and software, JSON-ready) and
:func:`hardware_name` (the line a report names it by)."""

from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["environment", "hardware_name"]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _driver() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        return out.split("\n")[0].strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device | str) -> dict:
    """The hardware and software a result was measured on (JSON-ready).

    Keys: date, time (local, ISO), device, cpu, cpu_threads, python, torch, triton, timm,
    shapkern; on CUDA also gpu, capability (MAJOR.MINOR), gpu_memory_gib, cuda and driver.
    """
    import timm
    import triton

    import shapkern

    device = torch.device(device)
    now = datetime.datetime.now()
    env = {
        "date": now.date().isoformat(),
        "time": now.isoformat(timespec="seconds"),
        "device": str(device),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "timm": timm.__version__,
        "shapkern": shapkern.__version__,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            driver=_driver(),
        )
    return env


def hardware_name(env: dict) -> str:
    """The GPU's name, or "<CPU model> (<threads> threads)"."""
    threads = env["cpu_threads"]
    return env.get("gpu") or f"{env['cpu']} ({threads} thread{'' if threads == 1 else 's'})"
