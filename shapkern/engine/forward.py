"""The packed coalition engine: a model's outputs on B images × M patch coalitions in one pass.

Patches outside a coalition are dropped from the token sequence after the positional embedding
(docs/design.md, "The game"); all kept tokens of all (image, coalition) rows are packed into one
(T, D) tensor (:mod:`shapkern.packed`) and the model's own modules run on it, with varlen
attention inside each block. Patch and positional embedding run once per image. What is specific
to a model family (embedding, blocks, pooling, head) sits in its adapter (``engine/adapters``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from shapkern._deprecation import renamed_arguments
from shapkern.engine.adapters import BlockPath, ModelAdapter, Output, adapter_for
from shapkern.engine.chunking import check_chunk_rows, default_chunk_rows, run_chunks
from shapkern.engine.dispatch import resolve_route
from shapkern.engine.fp8 import check_fp8_forward_only
from shapkern.engine.inputs import check_coalitions, check_images
from shapkern.engine.masked import Baseline, MaskedInputForward
from shapkern.engine.options import (
    ATTENTIONS,
    OUTPUTS,
    Attention,
    Blocks,
    Mode,
    Precision,
    block_path,
    legacy_blocks,
)
from shapkern.packed import AttentionFn, PackPlan, pack_tokens

__all__ = [
    "CoalitionForward",
    "PackedTokens",
    "check_packed_model",
    "coalition_chunk_rows",
    "coalition_tokens",
    "embed_tokens",
    "fused_coalition_forward",
    "num_players",
    "resolve_paired",
]

PackedHead = Callable[[torch.Tensor, PackPlan], torch.Tensor]


@dataclass
class PackedTokens:
    """Final-norm token features of every (image, coalition) row, in the packed layout.

    Attributes:
        tokens: (T, D) features after the model's final norm.
        plan: the packing plan (cu_seqlens (R + 1,), token_patch (T,), ...).
        shape: (B, M); row r = b * M + m.
    """

    tokens: torch.Tensor
    plan: PackPlan
    shape: tuple[int, int]


def check_packed_model(model: nn.Module) -> None:
    """Raise NotImplementedError, naming the model and what is supported, unless packed mode runs it."""
    adapter_for(model)


def embed_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Patch and positional embedding once per image: (B, C, H, W) -> (B, P + N, D)."""
    return adapter_for(model).embed(images)


def num_players(model: nn.Module) -> int:
    """N, the number of patches of a model the packed engine runs."""
    return adapter_for(model).num_players


def resolve_paired(coalitions: torch.Tensor, paired: bool | None) -> bool:
    """``paired`` as given, or for None whether coalitions (B, M, N) come in complementary pairs
    2i, 2i+1 (one host read on CUDA, the cost the unpaired layout pays anyway)."""
    if paired is not None:
        return paired
    if coalitions.shape[1] % 2 or coalitions.numel() == 0:
        return False
    return bool((coalitions[:, 0::2] ^ coalitions[:, 1::2]).all())


def _row_activation_bytes(adapter: ModelAdapter, device: torch.device, paired: bool) -> int:
    """Live activation bytes of one (image, coalition) row on ``device``: ~16 D-wide tensors per
    token in one block, in every block when autograd keeps them. The tokens are the model's
    (P + N, D), in its dtype (2 bytes under autocast)."""
    prefix, players = adapter.num_prefix_tokens, adapter.num_players
    # A complementary pair holds P + N/2 tokens per row on average; otherwise P + N bounds a row.
    length = prefix + (players + 1) // 2 if paired else prefix + players
    element = 2 if torch.is_autocast_enabled(device.type) else next(adapter.model.parameters()).element_size()
    return length * adapter.width * element * 16 * (adapter.depth if torch.is_grad_enabled() else 1)


def coalition_chunk_rows(model: nn.Module, images: torch.Tensor, paired: bool) -> int:
    """The (image, coalition) rows per pass that the engine runs by default on ``images``
    (B, C, H, W): sized from free memory on CUDA, at most ``CPU_MAX_CHUNK_ROWS`` on the CPU
    (engine/chunking.py)."""
    row_bytes = _row_activation_bytes(adapter_for(model), images.device, paired)
    return default_chunk_rows(images.device, row_bytes)


class CoalitionForward:
    """A model and a batch of images, checked once, evaluated on any coalitions.

    ``CoalitionForward(model, images)(coalitions)`` is :func:`fused_coalition_forward`; games and
    self-explaining models keep one to evaluate many coalitions without re-checking the images.

    Args:
        model: a model of a family the packed engine runs (``engine/adapters``).
        images: (B, C, H, W) on the model's device.
        output: ``"logits"`` (B, M, K) or ``"pre_logits"`` (B, M, D).
        head: instead of the model's pooling and head, a function of the final-norm packed tokens
            (T, D) and the plan giving (R, K) per row (a self-explaining model's Shapley head).
        blocks: ``"auto"``, ``"plain"``, ``"compiled"`` or ``"fused"`` (see fused_coalition_forward).
        precision: ``"auto"`` or ``"fp8"``.
        attention: ``"auto"``, ``"varlen"``, ``"pairs"`` or an attention op (see fused_coalition_forward).
        chunk_rows: (image, coalition) rows per pass; None sizes them from free memory.
        sync_checks: check the images for non-finite values with a host sync on CUDA, so that a NaN
            is a ValueError rather than a device-side assertion (see ``check_images``).
    """

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        *,
        output: Output = "logits",
        head: PackedHead | None = None,
        blocks: Blocks = "auto",
        precision: Precision = "auto",
        attention: Attention | AttentionFn = "auto",
        chunk_rows: int | None = None,
        sync_checks: bool = False,
    ):
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if isinstance(attention, str) and attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS} or an attention op, got {attention!r}")
        check_chunk_rows(chunk_rows)
        self.adapter = adapter_for(model)
        check_images(images, model, sync=sync_checks)
        self.path = block_path(blocks, precision)
        if self.path is not None:
            self.adapter.check_block_path(self.path, images)
        self.images, self.output, self.head = images, output, head
        self.attention, self.chunk_rows = attention, chunk_rows

    @property
    def num_players(self) -> int:
        return self.adapter.num_players

    def _prepare(self, coalitions, paired: bool | None):
        coalitions = check_coalitions(
            coalitions, self.images.shape[0], self.num_players, self.images.device, paired=bool(paired)
        )
        paired = resolve_paired(coalitions, paired)
        return coalitions, paired, self._route(paired)

    def _route(self, paired: bool) -> tuple[BlockPath, AttentionFn]:
        if self.path == "fp8":
            check_fp8_forward_only(self.adapter.model, self.images)
        return resolve_route(self.adapter, self.images, self.path, self.attention, paired)

    def _blocks(self, tokens, coalitions, paired: bool, route: tuple[BlockPath, AttentionFn]):
        path, attention = route
        x, plan = pack_tokens(tokens, coalitions, self.adapter.num_prefix_tokens, paired=paired)
        return self.adapter.blocks(x, plan, attention, path), plan

    def tokens(
        self, coalitions: torch.Tensor | None, *, paired: bool | None = None, with_ends: bool = False
    ) -> PackedTokens:
        """Final-norm token features of every row, in one pass (no chunking, so one plan describes
        every row): coalitions bool (B, M, N) or (M, N) -> PackedTokens with tokens (T, D).

        ``with_ends`` prepends the full and the empty coalition to every image's coalitions (one
        complementary pair; ``coalitions`` may then be None), so that the full view of every image
        runs in the same pass and layout as its coalitions: rows b * (M + 2) and b * (M + 2) + 1.
        """
        if coalitions is None and not with_ends:
            raise ValueError("coalitions must be given unless with_ends=True")
        if coalitions is not None:
            coalitions, paired, route = self._prepare(coalitions, paired)
        else:
            route = self._route(paired is not False)
        if with_ends:
            batch = self.images.shape[0]
            ends = torch.ones(batch, 2, self.num_players, dtype=torch.bool, device=self.images.device)
            ends[:, 1] = False
            coalitions = ends if coalitions is None else torch.cat([ends, coalitions], dim=1)
            paired = paired is not False
        assert coalitions is not None and paired is not None  # for mypy: given, or made above
        x, plan = self._blocks(self.adapter.embed(self.images), coalitions, paired, route)
        return PackedTokens(
            tokens=self.adapter.final_norm(x), plan=plan, shape=(coalitions.shape[0], coalitions.shape[1])
        )

    def __call__(self, coalitions: torch.Tensor, *, paired: bool | None = None) -> torch.Tensor:
        """The outputs on every image and coalition: bool (B, M, N) or (M, N) -> (B, M, K).

        ``paired``: coalitions 2i and 2i+1 are complements (True), are not (False), or detect it
        (None). Pairs run in a layout known without a host sync.
        """
        coalitions, paired, route = self._prepare(coalitions, paired)
        batch = coalitions.shape[0]
        tokens = self.adapter.embed(self.images)
        rows = self.chunk_rows or default_chunk_rows(
            self.images.device, _row_activation_bytes(self.adapter, self.images.device, paired)
        )

        def run(chunk: torch.Tensor) -> torch.Tensor:
            x, plan = self._blocks(tokens, chunk, paired, route)
            if self.head is not None:
                out = self.head(self.adapter.final_norm(x), plan)
            else:
                out = self.adapter.pool_head(x, plan, self.output)
            return out.view(batch, chunk.shape[1], out.shape[-1])

        return torch.cat(run_chunks(run, coalitions, rows, paired), dim=1)


def coalition_tokens(
    model: nn.Module,
    images: torch.Tensor,
    coalitions: torch.Tensor,
    *,
    paired: bool | None = None,
    attention: Attention | AttentionFn = "auto",
    blocks: Blocks = "auto",
    precision: Precision = "auto",
    compiled: bool | None = None,
    fused: bool | None = None,
) -> PackedTokens:
    """The final-norm token features of every (image, coalition) row, in one packed pass.

    Args and behaviour as :func:`~shapkern.engine.fused_coalition_forward` (one pass, no chunking,
    so that one plan describes all rows). Returns a :class:`PackedTokens` with tokens (T, D).
    """
    blocks = legacy_blocks(blocks, compiled, fused)
    forward = CoalitionForward(model, images, blocks=blocks, precision=precision, attention=attention)
    return forward.tokens(coalitions, paired=paired)


@renamed_arguments(chunk_size="chunk_rows")
def fused_coalition_forward(
    model: nn.Module,
    images: torch.Tensor,
    coalitions: torch.Tensor,
    *,
    output: Output = "logits",
    chunk_rows: int | None = None,
    paired: bool | None = None,
    mode: Mode = "packed",
    baseline: Baseline = "zeros",
    attention: Attention | AttentionFn = "auto",
    blocks: Blocks = "auto",
    precision: Precision = "auto",
    compiled: bool | None = None,
    fused: bool | None = None,
) -> torch.Tensor:
    """The model's output on every image with only each coalition's patches present.

    Args:
        model: a model of a family the packed engine runs (timm VisionTransformer and the others in
            README's table), or any image classifier mapping (B, C, H, W) to (B, K)
            (``mode="input"``).
        images: (B, C, H, W).
        coalitions: bool (B, M, N), or (M, N) shared by all images; N = the model's patch count.
        output: ``"logits"`` (B, M, K) or ``"pre_logits"`` (B, M, D). For the token features use
            :func:`coalition_tokens`.
        chunk_rows: (image, coalition) rows per pass; bounds peak memory. Default: sized from the
            model and the free memory of the device (GPU memory on CUDA, available RAM on the CPU,
            at most 256 rows there). With autograd and several chunks, each chunk is recomputed
            in backward.
        paired: coalitions 2i and 2i+1 are complements (as ``sample_coalitions`` gives by default):
            True trusts it (checked on the device), False does not use it, None (default) detects
            it. Pairs run in a packed layout known without a host sync.
        mode: ``"packed"`` drops tokens (exact, fast); ``"input"`` replaces the pixels of absent
            patches by ``baseline`` and runs the full model.
        baseline: input mode only: ``"zeros"``, ``"mean"`` (per image and channel) or ``"blur"``.
        attention: ``"auto"`` (default): the measured dispatch table's choice for this device,
            model, phase and dtype (engine/dispatch.py; the varlen attention where nothing was
            measured); ``"varlen"``: the varlen kernels (Triton on CUDA); ``"pairs"``: complementary
            pairs as dense rows, one SDPA call each with a block-diagonal mask (paired coalitions
            only); or an attention op (see :class:`shapkern.ops.AttentionFn`) to compare kernels
            inside the same engine. Where the table has a route, ``blocks="auto"`` takes its block
            path too.
        blocks: how the blocks run. ``"compiled"``: under ``torch.compile``, which fuses LayerNorm,
            GELU and the residual adds into fewer passes over memory (the first call compiles).
            ``"fused"``: shapkern's fused kernels, residual add + LayerNorm in one pass and fc1 +
            bias + exact GELU in one GEMM (Triton on CUDA, the ops' PyTorch references elsewhere).
            ``"plain"``: the model's own modules. ``"auto"`` (default): compiled on CUDA with
            paired coalitions (static shapes), plain elsewhere; ``SHAPKERN_COMPILE=0`` makes it
            plain everywhere.
        precision: ``"auto"`` (the model's dtype under the current autocast) or ``"fp8"``: the qkv,
            proj, fc1 and fc2 GEMMs in e4m3 with per-token activation and per-channel weight scales
            (``torch._scaled_mm``; cached weights), everything else as ``"auto"``. Forward only (run
            it under ``torch.no_grad()``); CUDA needs compute capability 8.9+, the CPU computes the
            same numerics. Excludes ``blocks="compiled"`` and ``"fused"``. Packed mode only.
        compiled, fused: deprecated spellings of ``blocks``.

    Returns:
        (B, M, K) logits, or (B, M, D) with ``output="pre_logits"``. B = 0 gives an empty result.

    The empty coalition keeps only the prefix tokens (class, register, distillation); a model
    without prefix tokens then pools an all-zero feature vector. The full coalition equals the
    model's ordinary forward. Gradients flow to the model's parameters and to the images.
    """
    blocks = legacy_blocks(blocks, compiled, fused)
    if mode == "input":
        if precision != "auto":
            raise ValueError(
                f"precision={precision!r} needs mode='packed': pixel masking runs the model as is"
            )
        return MaskedInputForward(model, images, baseline=baseline, chunk_rows=chunk_rows)(coalitions)
    if mode != "packed":
        raise ValueError(f"mode must be 'packed' or 'input', got {mode!r}")
    forward = CoalitionForward(
        model,
        images,
        output=output,
        blocks=blocks,
        precision=precision,
        attention=attention,
        chunk_rows=chunk_rows,
    )
    return forward(coalitions, paired=paired)
