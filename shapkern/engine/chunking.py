"""How many (image, coalition) rows the engine runs per pass, on any device.

A chunk bounds peak memory: its activations, in every block when autograd keeps them, must fit in
a fraction of what the device has free. With several chunks under autograd, each chunk is
recomputed in backward (activation checkpointing), so peak memory is one chunk's activations.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["CPU_MAX_CHUNK_ROWS", "check_chunk_rows", "free_memory_bytes", "run_chunks"]

CPU_MAX_CHUNK_ROWS = 256  # beyond this, larger CPU GEMMs gain nothing measurable
MEMORY_FRACTION = 0.5  # of the free memory that one chunk's activations may take


def _available_host_bytes() -> int:
    """MemAvailable of /proc/meminfo (Linux), else free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_memory_bytes(device: torch.device) -> int:
    """Memory a new chunk can use: on CUDA the free device memory plus what torch's caching
    allocator holds unused (it reuses that); on the CPU the host's available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return _available_host_bytes()


def check_chunk_rows(chunk_rows: int | None) -> None:
    """A clear error for a ``chunk_rows`` (rows per pass) that is neither None nor a positive int."""
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")


def default_chunk_rows(device: torch.device, row_bytes: int) -> int:
    """Rows per chunk so that one chunk's activations (``row_bytes`` each) fit in memory."""
    rows = max(2, int(MEMORY_FRACTION * free_memory_bytes(device) / max(row_bytes, 1)))
    return rows if device.type == "cuda" else min(rows, CPU_MAX_CHUNK_ROWS)


def run_chunks(
    fn: Callable[[torch.Tensor], torch.Tensor], coalitions: torch.Tensor, chunk_rows: int, paired: bool
):
    """Apply fn to slices of the M coalitions (B, M, N), at most ``chunk_rows`` rows each.

    Returns the list of fn's outputs, one per chunk, in coalition order.
    """
    batch, num, _ = coalitions.shape
    if batch == 0:
        return [fn(coalitions)]
    step = max(1, chunk_rows // batch)
    if paired:
        step = max(2, step - step % 2)
    # Balance the chunks: equal shapes reuse compiled code, and no chunk is a small remainder.
    count = -(-num // step)
    step = -(-num // count)
    if paired:
        step += step % 2
    chunks = [coalitions[:, start : start + step] for start in range(0, num, step)]
    if len(chunks) > 1 and torch.is_grad_enabled():
        return [checkpoint(fn, chunk, use_reentrant=False) for chunk in chunks]
    return [fn(chunk) for chunk in chunks]
