"""The thread policy of CPU work (``shapkern train``, ``shapkern explain``): how many intra-op threads.

torch's default is one thread per physical core. On a machine that other processes keep busy that
is the slowest choice there is: OpenMP's threads meet at the end of every parallel region, so one
thread that loses its core holds up all the others (on 2 shared cores, training ran at 47 images/s
on torch's 2 threads and at 295 on one: benchmarks/results/2026-12-07-cpu/thread_policy.md). The
policy, in order:

1. an explicit count (``--threads N``, ``TrainConfig.threads``);
2. ``MKL_NUM_THREADS`` or ``OMP_NUM_THREADS`` when set: torch has read them, they stay as they are;
3. otherwise the cores this process may use (its CPU affinity and cgroup CPU quota, at most one per
   physical core), shared among the processes of a ``torchrun`` on this machine, and no more than
   the machine's cores left free by the others (``os.cpu_count()`` less the 1-minute load
   average); at least one.

The count changes results by rounding only: runs at the same count are bitwise identical, while
torch's CPU LayerNorm backward and small GEMMs sum per-thread partial results, so 1 and 2 threads
differ in the last bits (training losses 2e-8 apart, relative, after one digits epoch;
tests/test_train.py). Pass an explicit count where two runs must agree bitwise.

A plain low layer: it imports nothing from the rest of shapkern.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["THREAD_VARIABLES", "ThreadChoice", "apply_thread_policy", "choose_threads", "usable_cores"]

THREAD_VARIABLES = ("MKL_NUM_THREADS", "OMP_NUM_THREADS")  # torch lets MKL's override OpenMP's


@dataclass(frozen=True)
class ThreadChoice:
    """An intra-op thread count and why it was chosen (for the run line: ``str(choice)``)."""

    threads: int
    reason: str

    def __str__(self) -> str:
        return f"{self.threads} thread{'' if self.threads == 1 else 's'} ({self.reason})"


def _affinity() -> set[int] | None:
    """The CPUs this process may run on, where the OS says (Linux)."""
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return None


def _physical(cpus: set[int]) -> int:
    """Physical cores among ``cpus`` (hyper-threads of one core count once), from Linux's sysfs."""
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text())
        except OSError:
            return len(cpus)
    return len(cores)


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """CPUs' worth of time a cgroup CPU quota grants (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), or None."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, one per physical core, capped by a cgroup quota."""
    cpus = _affinity()
    cores = _physical(cpus) if cpus else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    return max(1, min(cores, quota) if quota else cores)


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this OS
        return None


def choose_threads(
    requested: int | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    cores: int | None = None,
    machine_cores: int | None = None,
    load: float | None = None,
) -> ThreadChoice:
    """The policy's thread count (module docstring), reading the machine for what is not given.

    Args:
        requested: an explicit count (``--threads``), or None for the policy.
        environ: the environment (default ``os.environ``): the thread variables and ``LOCAL_WORLD_SIZE``.
        cores: the cores this process may use (default :func:`usable_cores`).
        machine_cores: the machine's cores, which the load average is over (default ``os.cpu_count()``).
        load: the 1-minute load average (default ``os.getloadavg()``; None where there is none).
    """
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"--threads must be a positive int, got {requested!r}")
        return ThreadChoice(requested, "--threads")
    environ = os.environ if environ is None else environ
    for name in THREAD_VARIABLES:
        if environ.get(name):
            return ThreadChoice(torch.get_num_threads(), f"{name}={environ[name]}")
    cores = usable_cores() if cores is None else cores
    processes = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    threads = max(1, cores // processes)
    where = f"{cores} core{'' if cores == 1 else 's'}" + (
        f" / {processes} processes" if processes > 1 else ""
    )
    load = _load() if load is None else load
    if load is None:
        return ThreadChoice(threads, where)
    free = (machine_cores or os.cpu_count() or cores) - load
    threads = max(1, min(threads, math.floor(free / processes + 0.5)))
    return ThreadChoice(threads, f"{where}, load {load:.1f}")


def apply_thread_policy(threads: int | None = None) -> ThreadChoice:
    """Set torch's intra-op threads by :func:`choose_threads` (``threads``: an explicit count, or None
    for the policy); returns the choice, whose ``str`` is what a run line prints."""
    choice = choose_threads(threads)
    if choice.threads != torch.get_num_threads():
        torch.set_num_threads(choice.threads)
    return choice
