"""The engine's measured dispatch (issue 24): the block path and attention of a call left to the engine
(``blocks="auto"``, ``attention="auto"``), where a measurement says another route beats the default.

A route is measured, never guessed: ``python -m benchmarks.dispatch_table`` reads throughput runs
(every engine route and every alternative, timed in the same run on one GPU) and writes
:data:`~shapkern.engine.dispatch_table.ROUTES`, committed with those results, and the same routes
as JSON: ``SHAPKERN_DISPATCH_TABLE=routes.json`` makes a table measured on your own GPU the one in
force (in place of the committed one) for a whole program. A call looks up the
routes of its device (CUDA compute capability, or the CPU), model family, phase (``forward``, or
``forward+backward`` when autograd records), dtype (autocast's or the model's) and the measured
sequence length P + N nearest its own (within a factor of 2); paired coalitions only (the pair
attention needs them).
Without a route the default runs: compiled blocks on CUDA with paired coalitions, plain blocks
elsewhere, and the varlen attention (Triton on CUDA).
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from shapkern.engine.adapters import BlockPath, ModelAdapter
from shapkern.packed import AttentionFn, planned_attention, planned_pair_attention

__all__ = [
    "COMPILE_BY_DEFAULT",
    "MAX_TOKEN_RATIO",
    "Phase",
    "Route",
    "RouteAttention",
    "call_phase",
    "device_key",
    "find_route",
    "resolve_route",
    "routes_in_force",
]

TABLE_ENV = "SHAPKERN_DISPATCH_TABLE"
# A route measured at P + N tokens applies to sequences within this factor of it, no further: which
# path wins shifts with the sequence length (attention's share of the work grows with it).
MAX_TOKEN_RATIO = 2.0

# The default compiles the blocks on CUDA with paired coalitions (static shapes); SHAPKERN_COMPILE=0
# turns that off for a whole program.
COMPILE_BY_DEFAULT = os.environ.get("SHAPKERN_COMPILE", "1") != "0"
ATTENTION_FNS: dict[str, AttentionFn] = {"varlen": planned_attention, "pairs": planned_pair_attention}

Phase = Literal["forward", "forward+backward"]
RouteAttention = Literal["varlen", "pairs"]


@dataclass(frozen=True)
class Route:
    """One measured route: where it applies, what runs, and the measurement behind it.

    Attributes:
        device: ``"cuda:MAJOR.MINOR"`` (compute capability) or ``"cpu"``.
        family: the engine adapter's family (``"timm VisionTransformer"``, ...).
        phase: ``"forward"`` or ``"forward+backward"``.
        dtype: the compute dtype, ``"bfloat16"``, ``"float16"`` or ``"float32"``.
        tokens: P + N of the model it was measured on.
        blocks: the block path that runs (``"plain"``, ``"compiled"``, ``"fused"``).
        attention: ``"varlen"`` or ``"pairs"`` (dense pair rows, SDPA).
        speedup: its evaluations/s over the default route's, in that run.
        source: the results file it was read from, and the GPU.
    """

    device: str
    family: str
    phase: Phase
    dtype: str
    tokens: int
    blocks: BlockPath
    attention: RouteAttention
    speedup: float
    source: str


def device_key(device: torch.device) -> str:
    """A route's device key: ``"cuda:9.0"`` for compute capability 9.0, ``"cpu"`` elsewhere."""
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"cuda:{major}.{minor}"


def call_phase() -> Phase:
    """The phase of a call now: forward+backward when autograd records, else forward."""
    return "forward+backward" if torch.is_grad_enabled() else "forward"


def find_route(
    routes, device: torch.device, family: str, phase: Phase, dtype: torch.dtype, tokens: int
) -> Route | None:
    """The route of ``routes`` for this device, family, phase and dtype measured at the sequence
    length nearest ``tokens`` (by ratio, within :data:`MAX_TOKEN_RATIO`), or None (the default)."""
    key, name = device_key(device), str(dtype).removeprefix("torch.")

    def distance(route: Route) -> float:
        return abs(math.log(route.tokens / tokens))

    candidates = [
        r
        for r in routes
        if (r.device, r.family, r.phase, r.dtype) == (key, family, phase, name)
        and distance(r) <= math.log(MAX_TOKEN_RATIO)
    ]
    return min(candidates, key=distance, default=None)


@functools.lru_cache(maxsize=4)
def _routes_from_file(path: str) -> tuple[Route, ...]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{TABLE_ENV}={path}: cannot read a dispatch table ({exc})") from None
    try:
        return tuple(Route(**route) for route in data["routes"])
    except (KeyError, TypeError) as exc:
        raise ValueError(
            f"{TABLE_ENV}={path} is not a dispatch table written by benchmarks.dispatch_table ({exc!r})"
        ) from None


def routes_in_force() -> tuple[Route, ...]:
    """The JSON table that ``SHAPKERN_DISPATCH_TABLE`` names, else the committed one."""
    path = os.environ.get(TABLE_ENV)
    if path:
        return _routes_from_file(path)
    from shapkern.engine import dispatch_table  # imported here: the table imports Route

    return dispatch_table.ROUTES


def _measured_route(adapter: ModelAdapter, images: torch.Tensor, path: BlockPath | None) -> Route | None:
    """The dispatch table's route for a call on ``images``, when the block path it measured is
    ``path`` (fixed by the caller) or free (None), and the model runs it."""
    device = images.device
    on = torch.is_autocast_enabled(device.type)
    dtype = torch.get_autocast_dtype(device.type) if on else next(adapter.model.parameters()).dtype
    tokens = adapter.num_prefix_tokens + adapter.num_players
    route = find_route(routes_in_force(), device, adapter.family, call_phase(), dtype, tokens)
    if route is None or route.blocks not in adapter.block_paths:
        return None
    return route if path in (None, route.blocks) else None


def resolve_route(
    adapter: ModelAdapter,
    images: torch.Tensor,
    path: BlockPath | None,
    attention: str | AttentionFn,
    paired: bool,
) -> tuple[BlockPath, AttentionFn]:
    """The block path and attention op of a call: ``path`` (None: the engine's choice) and
    ``attention`` (``"auto"``, ``"varlen"``, ``"pairs"`` or an op) as given; those left to the engine
    with paired coalitions take the measured route; else the default, compiled blocks on CUDA with
    paired coalitions, plain otherwise, and the varlen attention."""
    route = _measured_route(adapter, images, path) if paired and attention == "auto" else None
    default: BlockPath = "compiled" if COMPILE_BY_DEFAULT and paired and images.is_cuda else "plain"
    chosen = path or (route.blocks if route else default)
    attention = route.attention if route else attention
    if attention == "pairs" and not paired:
        raise ValueError(
            "attention='pairs' runs complementary coalition pairs (2i, 2i+1) as dense rows: sample them "
            "with sample_coalitions(..., paired=True), or pass attention='varlen'"
        )
    if isinstance(attention, str):
        return chosen, ATTENTION_FNS["varlen" if attention == "auto" else attention]
    return chosen, attention
