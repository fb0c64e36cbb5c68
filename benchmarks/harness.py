"""What every benchmark shares: timing, the measured GEMM rate, the environment, results and tables.

- Timing: :func:`time_interleaved` warms every candidate, then times them round-robin (CUDA events
  on a GPU, ``perf_counter`` on the CPU), so that a noisy moment of the machine lands on all
  candidates alike instead of flipping one row; :func:`time_fn` times a single callable.
- :func:`gemm_tflops`: the dense GEMM rate of this device, the denominator of every FLOP floor.
- :func:`environment` and :func:`hardware_name` (from :mod:`benchmarks.machine`): what a result was
  measured on.
- Results: :func:`argument_parser` (``--device`` and ``--out``, defaults shown in ``--help``),
  :func:`results_dir` (a fresh git-ignored ``runs/benchmarks/<date>-<device>-<HHMMSS>/`` unless
  ``--out`` names a folder), :func:`write_json` and :func:`write_results`.
- :func:`markdown_table` (from :mod:`benchmarks.tables`): the one table format of every benchmark's
  Markdown.

Benchmarks import it as ``from benchmarks import harness`` and run from the repository root as
``python -m benchmarks.<name>``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from benchmarks.machine import environment, hardware_name
from benchmarks.tables import markdown_table

__all__ = [
    "CLOCKS",
    "DTYPES",
    "ROOT",
    "RUNS",
    "argument_parser",
    "command_line",
    "configure_cpu_threads",
    "default_device",
    "environment",
    "failure",
    "gemm_tflops",
    "hardware_name",
    "markdown_table",
    "relative_error",
    "results_dir",
    "synchronize",
    "time_fn",
    "time_interleaved",
    "write_json",
    "write_results",
]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ROOT = Path(__file__).resolve().parents[1]  # the repository root
# Default results root: inside the checkout but ignored by git (.gitignore lists runs/).
RUNS = ROOT / "runs" / "benchmarks"


# -- devices -----------------------------------------------------------------------------------


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def configure_cpu_threads() -> None:
    """Use every core for intra-op parallelism unless OMP_NUM_THREADS chose otherwise."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (nothing to wait for on the CPU), before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- timing ------------------------------------------------------------------------------------


CLOCKS = ("wall", "process")


def _call_ms(fn: Callable[[], object], device: torch.device, clock: str) -> tuple[float, float | None]:
    """Time of one fn() in ms, and on CUDA the peak memory allocated during it in MiB."""
    if device.type != "cuda":
        timer = time.perf_counter if clock == "wall" else time.process_time
        start = timer()
        fn()
        return (timer() - start) * 1e3, None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end), torch.cuda.max_memory_allocated(device) / 2**20


def failure(error: BaseException) -> str:
    """How a failed benchmark call is reported: "out of memory", or the exception's repr."""
    return "out of memory" if isinstance(error, torch.OutOfMemoryError) else repr(error)


class _Calls:
    """Makes the calls of :func:`time_interleaved`. With ``catch``, the first exception of a
    candidate is recorded in ``failed`` and the candidate is skipped from then on; without, it
    propagates."""

    def __init__(self, device: torch.device, catch: bool):
        self.device, self.catch = device, catch
        self.failed: dict[str, str] = {}

    def __call__(self, name: str, action: Callable[[], object]):
        """action()'s result, or None when the candidate failed now or before."""
        if name in self.failed:
            return None
        if not self.catch:
            return action()
        try:
            return action()
        except Exception as error:  # noqa: BLE001 - reported in the result, see time_interleaved
            self.failed[name] = failure(error)
        if self.device.type == "cuda":  # after the except clause, whose traceback holds the call's tensors
            torch.cuda.empty_cache()
        return None


def _timed_rounds(fns, device, repeats: int, clock: str, calls: _Calls):
    """``repeats`` rounds, round r starting at callable r mod n: name -> times (ms), name -> peak MiB."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    peaks: dict[str, float | None] = dict.fromkeys(fns)
    names = list(fns)
    for round_ in range(repeats):
        start = round_ % len(names)
        for name in names[start:] + names[:start]:
            measured = calls(name, lambda fn=fns[name]: _call_ms(fn, device, clock))
            if measured is None:
                continue
            ms, peak = measured
            times[name].append(ms)
            if peak is not None:
                peaks[name] = max(peaks[name] or 0.0, peak)
    return times, peaks


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    device: torch.device | str,
    *,
    warmup: int = 2,
    repeats: int = 5,
    catch: bool = False,
    clock: str = "wall",
) -> dict[str, dict]:
    """Time several callables against each other, round-robin.

    Every callable runs ``warmup`` times first (compilation, autotuning, allocator growth), then
    ``repeats`` rounds each call every callable once; round r starts at callable r mod n, so no
    callable always runs right after the same neighbour. A slow moment of a shared machine thus
    hits every callable in that round instead of one callable's whole measurement.

    Args:
        fns: name -> zero-argument callable. Its return value is dropped before the next call.
        device: where the callables run: CUDA events time a GPU, ``time.perf_counter`` the CPU.
        warmup: untimed calls per callable before the first round.
        repeats: timed calls per callable.
        catch: record an exception of a callable as ``{"failed": "..."}`` and drop it from the
            remaining rounds, so that one failing candidate does not hide the others. When False
            (the default) the exception propagates.
        clock: ``"wall"`` (CUDA events, or ``perf_counter`` on the CPU) or, on the CPU only,
            ``"process"``: the CPU time of this process (``time.process_time``), which other
            programs on a shared machine do not inflate; it measures work, not latency, and with
            several threads it also counts their waiting, so use it with OMP_NUM_THREADS=1.

    Returns:
        name -> ``{"median_ms", "min_ms", "max_ms", "times_ms" (in call order), "peak_mib"}``,
        in the order of ``fns``; ``peak_mib`` is the most GPU memory allocated during any one
        timed call (None on the CPU). A failed callable maps to ``{"failed": reason}``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    device = torch.device(device)
    if clock not in CLOCKS or (clock == "process" and device.type == "cuda"):
        raise ValueError(
            f"clock must be one of {CLOCKS} ('process' on the CPU only), got {clock!r} on {device}"
        )
    calls = _Calls(device, catch)
    for name, fn in fns.items():
        for _ in range(warmup):
            calls(name, fn)
    times, peaks = _timed_rounds(fns, device, repeats, clock, calls)
    return {name: _summary(times[name], peaks[name], calls.failed.get(name)) for name in fns}


def _summary(times: list[float], peak: float | None, failed: str | None) -> dict:
    if failed is not None:
        return {"failed": failed}
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "times_ms": times,
        "peak_mib": peak,
    }


def time_fn(
    fn: Callable[[], object],
    device: torch.device | str,
    *,
    warmup: int = 2,
    repeats: int = 5,
    clock: str = "wall",
) -> dict:
    """One callable's median, min and max time in ms and peak GPU memory (see time_interleaved)."""
    return time_interleaved({"fn": fn}, device, warmup=warmup, repeats=repeats, clock=clock)["fn"]


def gemm_tflops(
    device: torch.device | str, dtype: torch.dtype, size: int = 8192, repeats: int = 20, clock: str = "wall"
) -> float:
    """The measured rate of one (size × size) @ (size × size) GEMM in TFLOP/s (``clock`` as in
    :func:`time_interleaved`)."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    stats = time_fn(lambda: a @ b, device, warmup=3, repeats=repeats, clock=clock)
    return 2 * size**3 / (stats["median_ms"] * 1e-3) / 1e12


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64; a non-finite value in ``got`` gives inf."""
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


# -- command line and results ------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and shows every default except None ("chosen at run time")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def argument_parser(description: str | None, *, device: bool = True) -> argparse.ArgumentParser:
    """A parser whose ``--help`` shows the defaults, with ``--device`` (optional) and ``--out``.

    Args:
        description: usually the benchmark's module docstring.
        device: add ``--device {cuda,cpu}``, defaulting to :func:`default_device`.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    if device:
        parser.add_argument(
            "--device",
            default=default_device(),
            choices=["cuda", "cpu"],
            help="where to run (cuda when visible)",
        )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=(
            "results folder (default: a fresh runs/benchmarks/<date>-<device>-<HHMMSS>/, ignored by "
            "git; committed results go to benchmarks/results/<date>-<hardware>/)"
        ),
    )
    return parser


def _device_slug(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device).lower().replace("nvidia", "")
        return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"
    return device.type


def results_dir(out: Path | str | None, device: torch.device | str) -> Path:
    """Where a run writes: ``out`` when given, else a new ``runs/benchmarks/<date>-<device>-<HHMMSS>/``.

    The default folder is fresh for every run (a suffix -2, -3, ... avoids a clash within one
    second), so that no run overwrites another, and it lies under the git-ignored runs/ folder of
    the checkout. The folder is created.
    """
    if out is not None:
        path = Path(out)
    else:
        now = datetime.datetime.now()
        base = RUNS / f"{now:%Y-%m-%d}-{_device_slug(device)}-{now:%H%M%S}"
        path, suffix = base, 2
        while path.exists():
            path, suffix = base.with_name(f"{base.name}-{suffix}"), suffix + 1
    path.mkdir(parents=True, exist_ok=True)
    return path


def command_line() -> str:
    """This process's command, as a person would retype it from the repository root:
    ``python -m benchmarks.<module> ...`` for a benchmark (``python -m`` sets ``sys.argv[0]`` to
    the module's file), else ``python <script> ...``."""
    script = Path(sys.argv[0])
    try:
        relative = script.resolve().relative_to(ROOT)
    except ValueError:
        return shlex.join(["python", str(script), *sys.argv[1:]])
    if relative.parts[0] == "benchmarks" and relative.suffix == ".py":
        module = relative.with_suffix("").parts
        module = module[:-1] if module[-1] == "__main__" else module
        return shlex.join(["python", "-m", ".".join(module), *sys.argv[1:]])
    return shlex.join(["python", str(relative), *sys.argv[1:]])


def write_json(path: Path | str, payload: object) -> Path:
    """Write payload as indented JSON (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def write_results(out: Path | str, stem: str, payload: object, markdown: str) -> None:
    """Write ``<out>/<stem>.json`` and ``<out>/<stem>.md``."""
    out = Path(out)
    write_json(out / f"{stem}.json", payload)
    (out / f"{stem}.md").write_text(markdown if markdown.endswith("\n") else markdown + "\n")
