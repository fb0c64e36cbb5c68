"""The packed coalition engine for timm Vision Transformers.

Patches outside a coalition are dropped from the token sequence after the positional embedding
(docs/design.md, "The game"); all kept tokens of all (image, coalition) rows are packed into one
(T, D) tensor (:mod:`shapkern.packed`) and the model's own modules run on it, with varlen
attention inside each block. Patch and positional embedding run once per image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from shapkern.engine.blocks import (
    compiled_block_forward,
    fused_blocks_forward,
    packed_block_forward,
    supports_fused_blocks,
)
from shapkern.engine.chunking import check_chunk_size, default_chunk_rows, run_chunks
from shapkern.engine.fp8 import check_fp8_blocks, fp8_blocks_forward
from shapkern.engine.inputs import check_coalitions, check_images
from shapkern.engine.masked import masked_input_forward
from shapkern.packed import (
    AttentionFn,
    PackPlan,
    first_tokens,
    pack_tokens,
    planned_attention,
    segment_mean,
)

__all__ = [
    "OUTPUTS",
    "PRECISIONS",
    "PackedTokens",
    "check_packed_model",
    "check_precision",
    "coalition_chunk_rows",
    "coalition_tokens",
    "embed_tokens",
    "fused_coalition_forward",
    "num_players",
    "packed_block_forward",
]

SUPPORTED = (
    "timm VisionTransformer and VisionTransformerDistilled (DeiT) with global_pool 'token' or 'avg', "
    "class/register/distillation tokens, no_embed_class, qk_norm, LayerScale, any depth, width and "
    "patch size, built from timm's Block and Attention layers. For other models (attention pooling "
    "'map', Swin, ConvNets, ...) use mode='input', which masks pixels"
)
OUTPUTS = ("logits", "pre_logits")
# "auto": the model's dtype under the current autocast; "fp8": e4m3 GEMMs, forward only (engine/fp8.py).
PRECISIONS = ("auto", "fp8")
# torch.compile of the blocks on CUDA with paired coalitions (static shapes) unless the caller
# passes compiled=False; SHAPKERN_COMPILE=0 turns the default off for a whole program.
COMPILE_BY_DEFAULT = os.environ.get("SHAPKERN_COMPILE", "1") != "0"


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


def _timm_vit_classes():
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    return VisionTransformer, Block, Attention


def _unsupported(model: nn.Module, why: str) -> NotImplementedError:
    return NotImplementedError(
        f"{type(model).__name__} is not supported by the packed coalition engine ({why}). "
        f"Supported: {SUPPORTED}."
    )


def check_packed_model(model: nn.Module) -> None:
    """Raise NotImplementedError, naming the model and what is supported, unless packed mode runs it."""
    vit_cls, block_cls, attention_cls = _timm_vit_classes()
    if not isinstance(model, vit_cls):
        raise _unsupported(model, "not a timm VisionTransformer")
    if model.attn_pool is not None:
        raise _unsupported(model, "attention pooling 'map'")
    if model.global_pool not in ("token", "avg"):
        raise _unsupported(model, f"global_pool {model.global_pool!r}")
    if model.global_pool == "avg" and model.pool_include_prefix:
        raise _unsupported(model, "average pooling that includes prefix tokens")
    if model.dynamic_img_size:
        raise _unsupported(model, "dynamic_img_size")
    for block in model.blocks:
        if type(block) is not block_cls or type(block.attn) is not attention_cls:
            raise _unsupported(model, f"block {type(block).__name__} with {type(block.attn).__name__}")
        if model.training and block.attn.attn_drop.p > 0:
            raise _unsupported(model, "attention dropout in train mode")
    if model.training and not isinstance(model.patch_drop, nn.Identity):
        raise _unsupported(model, "PatchDropout in train mode")


def num_players(model: nn.Module) -> int:
    """N, the number of patches of a timm ViT's input grid."""
    return model.patch_embed.num_patches


def _prefix_tokens(model: nn.Module) -> list[torch.Tensor]:
    # Prefix order as timm builds it: class, distillation (DeiT), register tokens.
    names = ("cls_token", "dist_token", "reg_token")
    return [getattr(model, name) for name in names if getattr(model, name, None) is not None]


def embed_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Patch and positional embedding once per image: (B, C, H, W) -> (B, P + N, D).

    Mirrors timm's ``_pos_embed`` without its dropout, which runs per coalition after packing.
    """
    x = model.patch_embed(images)
    prefix = [token.expand(x.shape[0], -1, -1) for token in _prefix_tokens(model)]
    if model.pos_embed is None:
        return torch.cat(prefix + [x], dim=1)
    if model.no_embed_class:
        return torch.cat(prefix + [x + model.pos_embed], dim=1)
    return torch.cat(prefix + [x], dim=1) + model.pos_embed


def _blocks(model: nn.Module, tokens: torch.Tensor, coalitions: torch.Tensor, paired, attention, path: str):
    """Pack one chunk and run the blocks: tokens (B, P + N, D), coalitions (B, m, N) -> (T, D), plan."""
    x, plan = pack_tokens(tokens, coalitions, model.num_prefix_tokens, paired=paired)
    x = model.norm_pre(model.pos_drop(x))
    if path == "fused":
        return fused_blocks_forward(model, x, plan, attention), plan
    if path == "fp8":
        return fp8_blocks_forward(model, x, plan, attention), plan
    block_forward = compiled_block_forward() if path == "compiled" else packed_block_forward
    for block in model.blocks:
        x = block_forward(block, x, plan, attention)
    return x, plan


def _pooled_head(model: nn.Module, x: torch.Tensor, plan: PackPlan, output: str) -> torch.Tensor:
    """The model's pooling and head on packed block outputs: (T, D) -> (R, K) or (R, D)."""
    num_prefix = model.num_prefix_tokens
    if model.global_pool == "token":
        pooled = model.norm(first_tokens(x, plan, num_prefix))
    else:
        x = model.norm(x)
        pooled = torch.cat([first_tokens(x, plan, num_prefix), segment_mean(x, plan).unsqueeze(1)], dim=1)
    return model.forward_head(pooled, pre_logits=output == "pre_logits")


def _row_activation_bytes(model: nn.Module, device: torch.device, paired: bool) -> int:
    """Live activation bytes of one (image, coalition) row on ``device``: ~16 D-wide tensors per
    token in one block, in every block when autograd keeps them. The tokens are the model's
    (P + N, D), in its dtype (2 bytes under autocast)."""
    prefix, players = model.num_prefix_tokens, num_players(model)
    # A complementary pair holds P + N/2 tokens per row on average; otherwise P + N bounds a row.
    length = prefix + (players + 1) // 2 if paired else prefix + players
    element = 2 if torch.is_autocast_enabled(device.type) else next(model.parameters()).element_size()
    return length * model.embed_dim * element * 16 * (len(model.blocks) if torch.is_grad_enabled() else 1)


def coalition_chunk_rows(model: nn.Module, images: torch.Tensor, paired: bool) -> int:
    """The (image, coalition) rows per pass that :func:`fused_coalition_forward` runs by default on
    ``images`` (B, C, H, W), also for callers that chunk their own passes over
    :func:`coalition_tokens`: sized from free memory on CUDA, at most ``CPU_MAX_CHUNK_ROWS`` on the
    CPU (engine/chunking.py)."""
    return default_chunk_rows(images.device, _row_activation_bytes(model, images.device, paired))


def check_precision(precision: str) -> None:
    """A clear error for a ``precision`` that is not one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _block_path(model: nn.Module, images: torch.Tensor, paired: bool, compiled, fused, precision) -> str:
    """``"fp8"`` GEMMs, ``"fused"`` kernels, ``"compiled"`` blocks or the ``"plain"`` modules (see
    fused_coalition_forward)."""
    check_precision(precision)
    if precision == "fp8":
        if fused or compiled:
            raise ValueError(
                "precision='fp8' runs its own block path: it excludes compiled=True and fused=True"
            )
        check_fp8_blocks(model, images)
        return "fp8"
    if fused and compiled:
        raise ValueError("compiled=True and fused=True exclude each other: pick one way to fuse the blocks")
    if fused:
        if not supports_fused_blocks(model):
            raise NotImplementedError(
                f"fused=True needs timm Blocks with affine LayerNorms, an Mlp of Linear + exact GELU and "
                f"LayerScale or none; {type(model).__name__} has others. Use fused=False."
            )
        return "fused"
    if compiled is None:
        compiled = COMPILE_BY_DEFAULT and paired and images.is_cuda
    return "compiled" if compiled else "plain"


def _prepare(
    model: nn.Module, images: torch.Tensor, coalitions: torch.Tensor, paired: bool, compiled, fused, precision
):
    """Checks shared by the public entry points: coalitions (B, M, N), embedded tokens, block path."""
    check_packed_model(model)
    check_images(images, model)
    coalitions = check_coalitions(
        coalitions, images.shape[0], num_players(model), images.device, paired=paired
    )
    path = _block_path(model, images, paired, compiled, fused, precision)
    return coalitions, embed_tokens(model, images), path


def coalition_tokens(
    model: nn.Module,
    images: torch.Tensor,
    coalitions: torch.Tensor,
    *,
    paired: bool = False,
    attention: AttentionFn = planned_attention,
    compiled: bool | None = None,
    fused: bool = False,
    precision: str = "auto",
) -> PackedTokens:
    """The final-norm token features of every (image, coalition) row, in one packed pass.

    Args and behaviour as :func:`fused_coalition_forward` (one pass, no chunking, so that one plan
    describes all rows). Returns a :class:`PackedTokens` with tokens (T, D).
    """
    coalitions, tokens, path = _prepare(model, images, coalitions, paired, compiled, fused, precision)
    x, plan = _blocks(model, tokens, coalitions, paired, attention, path)
    return PackedTokens(tokens=model.norm(x), plan=plan, shape=tuple(coalitions.shape[:2]))


def fused_coalition_forward(
    model: nn.Module,
    images: torch.Tensor,
    coalitions: torch.Tensor,
    *,
    output: str = "logits",
    chunk_size: int | None = None,
    paired: bool = False,
    mode: str = "packed",
    baseline: str = "zeros",
    attention: AttentionFn = planned_attention,
    compiled: bool | None = None,
    fused: bool = False,
    precision: str = "auto",
) -> torch.Tensor:
    """The model's output on every image with only each coalition's patches present.

    Args:
        model: a timm VisionTransformer-family model (packed mode), or any image classifier
            mapping (B, C, H, W) to (B, K) (``mode="input"``).
        images: (B, C, H, W).
        coalitions: bool (B, M, N), or (M, N) shared by all images; N = the model's patch count.
        output: ``"logits"`` (B, M, K) or ``"pre_logits"`` (B, M, D). For the token features use
            :func:`coalition_tokens`.
        chunk_size: (image, coalition) rows per pass; bounds peak memory. Default: sized from the
            model and the free memory of the device (GPU memory on CUDA, available RAM on the CPU,
            at most 256 rows there). With autograd and several chunks, each chunk is recomputed
            in backward.
        paired: coalitions 2i and 2i+1 are complements (as ``sample_coalitions(paired=True)``
            gives); the packed layout then needs no host sync.
        mode: ``"packed"`` drops tokens (exact, fast); ``"input"`` replaces the pixels of absent
            patches by ``baseline`` and runs the full model.
        baseline: input mode only: ``"zeros"``, ``"mean"`` (per image and channel) or ``"blur"``.
        attention: the varlen attention op (see :class:`shapkern.ops.AttentionFn`); override it
            to compare attention kernels inside the same engine.
        compiled: run the blocks under ``torch.compile``, which fuses LayerNorm, GELU and the
            residual adds into fewer passes over memory; the first call compiles. Default: on for
            CUDA inputs with ``paired=True`` (static shapes), off elsewhere; ``False``, or the
            environment variable ``SHAPKERN_COMPILE=0``, gives the plain path.
        fused: run the blocks with shapkern's fused kernels instead: residual add + LayerNorm in
            one pass and fc1 + bias + exact GELU in one GEMM (Triton on CUDA, the ops' PyTorch
            references elsewhere). Excludes ``compiled=True``.
        precision: ``"auto"`` (the model's dtype under the current autocast) or ``"fp8"``: the qkv,
            proj, fc1 and fc2 GEMMs in e4m3 with per-token activation and per-channel weight scales
            (``torch._scaled_mm``; cached weights), everything else as ``"auto"``. Forward only (run
            it under ``torch.no_grad()``); CUDA needs compute capability 8.9+, the CPU computes the
            same numerics. Excludes ``compiled=True`` and ``fused=True``. Packed mode only.

    Returns:
        (B, M, K) logits, or (B, M, D) with ``output="pre_logits"``. B = 0 gives an empty result.

    The empty coalition keeps only the prefix tokens (class, register, distillation); a model
    without prefix tokens then pools an all-zero feature vector. The full coalition equals the
    model's ordinary forward. Gradients flow to the model's parameters and to the images.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    check_chunk_size(chunk_size)
    if mode == "input":
        if precision != "auto":
            raise ValueError(
                f"precision={precision!r} needs mode='packed': pixel masking runs the model as is"
            )
        return masked_input_forward(model, images, coalitions, baseline=baseline, chunk_size=chunk_size)
    if mode != "packed":
        raise ValueError(f"mode must be 'packed' or 'input', got {mode!r}")
    coalitions, tokens, path = _prepare(model, images, coalitions, paired, compiled, fused, precision)
    batch = coalitions.shape[0]
    chunk_rows = chunk_size or coalition_chunk_rows(model, images, paired)

    def run(chunk: torch.Tensor) -> torch.Tensor:
        x, plan = _blocks(model, tokens, chunk, paired, attention, path)
        out = _pooled_head(model, x, plan, output)
        return out.view(batch, chunk.shape[1], out.shape[-1])

    return torch.cat(run_chunks(run, coalitions, chunk_rows, paired), dim=1)
