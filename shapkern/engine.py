"""The coalition engine: a model's output on B images × M patch coalitions in one batched pass.

Packed mode (timm VisionTransformer family) drops the patches outside each coalition from the
token sequence after the positional embedding (design.md §1), packs all kept tokens of all
(image, coalition) pairs into one (T, D) tensor and runs the model's own blocks on it with
varlen attention. Input mode masks pixels instead and works for any image classifier.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from shapkern.coalitions import PackPlan
from shapkern.nn import drop_path_packed, first_tokens, pack_tokens, segment_mean, varlen_attention

__all__ = [
    "PackedTokens",
    "check_images",
    "check_packed_model",
    "fused_coalition_forward",
    "masked_input_forward",
    "num_players",
    "packed_block_forward",
]

SUPPORTED = (
    "timm VisionTransformer and VisionTransformerDistilled (DeiT) with global_pool 'token' or 'avg', "
    "class/register/distillation tokens, no_embed_class, qk_norm, LayerScale, any depth, width and "
    "patch size, built from timm's Block and Attention layers. For other models (attention pooling "
    "'map', Swin, ConvNets, ...) use mode='input', which masks pixels"
)
OUTPUTS = ("logits", "pre_logits", "tokens")
BASELINES = ("zeros", "mean", "blur")
CPU_CHUNK_ROWS = 256
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
        f"{type(model).__name__} is not supported by the packed coalition engine ({why}). Supported: {SUPPORTED}."
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


def _drop_path(module: nn.Module, x: torch.Tensor, plan: PackPlan) -> torch.Tensor:
    if not module.training or isinstance(module, nn.Identity):
        return x
    return drop_path_packed(x, module.drop_prob, plan, scale_by_keep=module.scale_by_keep)


def _attention(attn: nn.Module, x: torch.Tensor, plan: PackPlan, attention) -> torch.Tensor:
    """timm Attention on packed tokens: (T, D) -> (T, D)."""
    tokens = x.shape[0]
    q, k, v = attn.qkv(x).view(tokens, 3, attn.num_heads, attn.head_dim).unbind(1)
    # Under autocast, q/k norms return fp32 while v keeps the autocast dtype; attention takes one dtype.
    q, k = attn.q_norm(q).to(v.dtype), attn.k_norm(k).to(v.dtype)
    out = attention(q, k, v, plan.cu_seqlens, plan.max_seqlen, scale=attn.scale)
    out = attn.norm(out.reshape(tokens, attn.num_heads * attn.head_dim))
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def packed_block_forward(
    block: nn.Module, x: torch.Tensor, plan: PackPlan, attention=varlen_attention
) -> torch.Tensor:
    """One timm Block on packed tokens: (T, D) -> (T, D).

    ``attention(q, k, v, cu_seqlens, max_seqlen, scale=...)`` maps (T, H, Dh) to (T, H, Dh).
    """
    attended = _attention(block.attn, block.norm1(x), plan, attention)
    x = x + _drop_path(block.drop_path1, block.ls1(attended), plan)
    return x + _drop_path(block.drop_path2, block.ls2(block.mlp(block.norm2(x))), plan)


@cache
def _compiled_block_forward():
    # Inductor fuses the memory-bound work between the GEMMs (residual + LayerNorm, bias + GELU);
    # the attention op stays one custom op. Blocks of one model share the compiled code (their
    # parameters are graph inputs); shapes turn dynamic after a first change of T.
    return torch.compile(packed_block_forward)


def _packed_rows(
    model: nn.Module, tokens: torch.Tensor, coalitions: torch.Tensor, output: str, paired, attention, compiled
):
    """Run the blocks and head for one chunk: tokens (B, P + N, D), coalitions (B, m, N)."""
    num_prefix = model.num_prefix_tokens
    x, plan = pack_tokens(tokens, coalitions, num_prefix, paired=paired)
    x = model.norm_pre(model.pos_drop(x))
    block_forward = _compiled_block_forward() if compiled else packed_block_forward
    for block in model.blocks:
        x = block_forward(block, x, plan, attention)
    if output == "tokens":
        return model.norm(x), plan
    if model.global_pool == "token":
        pooled = model.norm(first_tokens(x, plan, num_prefix))
    else:
        x = model.norm(x)
        pooled = torch.cat([first_tokens(x, plan, num_prefix), segment_mean(x, plan).unsqueeze(1)], dim=1)
    return model.forward_head(pooled, pre_logits=output == "pre_logits")


def _row_activation_bytes(model: nn.Module, tokens: torch.Tensor, paired: bool) -> int:
    """Live activation bytes of one (image, coalition) row: ~16 D-wide tensors per token in one
    block, in every block when autograd keeps them. tokens: (B, P + N, D)."""
    prefix = model.num_prefix_tokens
    players = tokens.shape[1] - prefix
    # A complementary pair holds P + N/2 tokens per row on average; otherwise P + N bounds a row.
    length = prefix + (players + 1) // 2 if paired else prefix + players
    element = 2 if torch.is_autocast_enabled() else tokens.element_size()
    return length * tokens.shape[2] * element * 16 * (len(model.blocks) if torch.is_grad_enabled() else 1)


def _free_cuda_bytes(device: torch.device) -> int:
    """Free device memory plus what torch's caching allocator holds unused (it can reuse that)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _default_chunk_rows(model: nn.Module, tokens: torch.Tensor, paired: bool) -> int:
    if tokens.device.type != "cuda":
        return CPU_CHUNK_ROWS
    return max(2, int(0.5 * _free_cuda_bytes(tokens.device) / _row_activation_bytes(model, tokens, paired)))


def check_images(images) -> None:
    """Raise ValueError unless images is a floating (B, C, H, W) tensor."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError("images must be a floating (B, C, H, W) tensor")


def _check_inputs(model: nn.Module, images: torch.Tensor, coalitions: torch.Tensor, players: int):
    """Validate and broadcast coalitions to (B, M, N)."""
    check_images(images)
    if not isinstance(coalitions, torch.Tensor) or coalitions.dtype != torch.bool:
        got = coalitions.dtype if isinstance(coalitions, torch.Tensor) else type(coalitions).__name__
        raise TypeError(f"coalitions must be a bool tensor (B, M, N) or (M, N), got {got}")
    if coalitions.dim() == 2:
        coalitions = coalitions.unsqueeze(0).expand(images.shape[0], -1, -1)
    if coalitions.dim() != 3 or coalitions.shape[0] != images.shape[0]:
        raise ValueError(
            f"coalitions must be (B, M, N) with B = {images.shape[0]} images, or (M, N); "
            f"got {tuple(coalitions.shape)}"
        )
    if coalitions.shape[2] != players:
        raise ValueError(
            f"coalitions have N = {coalitions.shape[2]} players but the model has {players} patches"
        )
    if coalitions.shape[1] == 0:
        raise ValueError("coalitions must hold at least one coalition (M >= 1)")
    param = next(model.parameters(), None)
    if param is not None and param.device != images.device:
        raise ValueError(f"images are on {images.device} but the model is on {param.device}")
    if coalitions.device != images.device:
        raise ValueError(f"coalitions are on {coalitions.device} but images are on {images.device}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values")
    return coalitions


def _run_chunks(fn, coalitions: torch.Tensor, chunk_rows: int, paired: bool) -> list:
    """Apply fn to slices of the M coalitions, at most chunk_rows (image, coalition) rows each."""
    batch, num, _ = coalitions.shape
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
        # Recompute each chunk in backward so that peak memory is one chunk's activations.
        return [checkpoint(fn, chunk, use_reentrant=False) for chunk in chunks]
    return [fn(chunk) for chunk in chunks]


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
    attention=varlen_attention,
    compiled: bool | None = None,
):
    """The model's output on every image with only each coalition's patches present.

    Args:
        model: a timm VisionTransformer-family model (packed mode), or any image classifier
            mapping (B, C, H, W) to (B, K) (``mode="input"``).
        images: (B, C, H, W).
        coalitions: bool (B, M, N), or (M, N) shared by all images; N = the model's patch count.
        output: ``"logits"`` (B, M, K), ``"pre_logits"`` (B, M, D) or ``"tokens"`` (a
            :class:`PackedTokens` of the final-norm token features; packed mode only).
        chunk_size: (image, coalition) rows per pass; bounds peak memory. Default: from free GPU
            memory on CUDA, 256 on CPU. With autograd and several chunks, each chunk is
            recomputed in backward.
        paired: coalitions 2i and 2i+1 are complements (as ``sample_coalitions(paired=True)``
            gives); the packed layout then needs no host sync.
        mode: ``"packed"`` drops tokens (exact, fast); ``"input"`` replaces the pixels of absent
            patches by ``baseline`` and runs the full model.
        baseline: input mode only: ``"zeros"``, ``"mean"`` (per image and channel) or ``"blur"``.
        attention: the varlen attention op, ``(q, k, v, cu_seqlens, max_seqlen, scale=...)`` on
            (T, H, Dh); override it to compare attention kernels inside the same engine.
        compiled: run the blocks under ``torch.compile``, which fuses LayerNorm, GELU and the
            residual adds into fewer passes over memory; the first call compiles. Default: on for
            CUDA inputs with ``paired=True`` (static shapes), off elsewhere; ``False``, or the
            environment variable ``SHAPKERN_COMPILE=0``, gives the plain path.

    The empty coalition keeps only the prefix tokens (class, register, distillation); a model
    without prefix tokens then pools an all-zero feature vector. The full coalition equals the
    model's ordinary forward. Gradients flow to the model's parameters and to the images.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if mode == "input":
        return masked_input_forward(model, images, coalitions, baseline=baseline, chunk_size=chunk_size)
    if mode != "packed":
        raise ValueError(f"mode must be 'packed' or 'input', got {mode!r}")
    check_packed_model(model)
    coalitions = _check_inputs(model, images, coalitions, num_players(model))
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    batch, num, _ = coalitions.shape
    tokens = embed_tokens(model, images)
    chunk_rows = chunk_size or _default_chunk_rows(model, tokens, paired)
    if compiled is None:
        compiled = COMPILE_BY_DEFAULT and paired and images.is_cuda
    if output == "tokens":
        # One pass, so that the plan describes all rows.
        x, plan = _packed_rows(model, tokens, coalitions, output, paired, attention, compiled)
        return PackedTokens(tokens=x, plan=plan, shape=(batch, num))

    def run(chunk: torch.Tensor) -> torch.Tensor:
        return _packed_rows(model, tokens, chunk, output, paired, attention, compiled)

    outs = _run_chunks(run, coalitions, chunk_rows, paired)
    return torch.cat([out.view(batch, -1, out.shape[-1]) for out in outs], dim=1)


def _patch_grid(model: nn.Module, images: torch.Tensor, players: int) -> tuple[int, int]:
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is not None and grid[0] * grid[1] == players:
        return tuple(grid)
    side = round(players**0.5)
    if side * side != players:
        raise ValueError(
            f"cannot lay N = {players} players on a square patch grid; pass a timm ViT or square N"
        )
    return side, side


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(3 * sigma))
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    x = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def _baseline_images(images: torch.Tensor, baseline: str, patch: tuple[int, int]) -> torch.Tensor:
    if baseline == "zeros":
        return torch.zeros_like(images)
    if baseline == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    if baseline == "blur":
        return _gaussian_blur(images, sigma=max(patch) / 2)
    raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")


def masked_input_forward(
    model: nn.Module,
    images: torch.Tensor,
    coalitions: torch.Tensor,
    *,
    baseline: str = "zeros",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Any image classifier on pixel-masked images: the pixels of absent patches become ``baseline``.

    Args:
        model: maps (B, C, H, W) to (B, K).
        images: (B, C, H, W).
        coalitions: bool (B, M, N) or (M, N); the N patches tile the image as a grid (the timm
            patch grid when the model has one, else a square grid).
        baseline: ``"zeros"``, ``"mean"`` (per image and channel) or ``"blur"`` (Gaussian,
            sigma = half a patch).
        chunk_size: masked images per model call (default 256 on CPU, 1024 on CUDA).

    Returns:
        (B, M, K).
    """
    players = coalitions.shape[-1] if isinstance(coalitions, torch.Tensor) else 0
    grid = _patch_grid(model, images, players) if players else (1, 1)
    coalitions = _check_inputs(model, images, coalitions, grid[0] * grid[1])
    height, width = images.shape[-2:]
    if height % grid[0] or width % grid[1]:
        raise ValueError(
            f"images of size {height}x{width} do not split into a {grid[0]}x{grid[1]} patch grid"
        )
    patch = (height // grid[0], width // grid[1])
    reference = _baseline_images(images, baseline, patch)
    batch = coalitions.shape[0]
    chunk_rows = chunk_size or (1024 if images.device.type == "cuda" else CPU_CHUNK_ROWS)

    def run(chunk: torch.Tensor) -> torch.Tensor:
        pixels = chunk.view(batch, -1, *grid).repeat_interleave(patch[0], 2).repeat_interleave(patch[1], 3)
        masked = torch.where(pixels.unsqueeze(2), images.unsqueeze(1), reference.unsqueeze(1))
        return model(masked.flatten(0, 1))

    outs = _run_chunks(run, coalitions, chunk_rows, paired=False)
    return torch.cat([out.view(batch, -1, out.shape[-1]) for out in outs], dim=1)
