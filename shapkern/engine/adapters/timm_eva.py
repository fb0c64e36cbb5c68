"""timm's Eva family on the packed engine: EVA-02, EVA-CLIP, the rotary ViTs (``vit_*_rope_*``: axial,
mixed, with or without absolute position embedding), Perception Encoder, DINOv3 (built with
``dynamic_img_size=False``).

Tokens of absent patches are dropped after the positional embedding, as timm's patch dropout drops
them: every kept patch token keeps the rotary embedding of its own grid position (the plan's
``token_patch``) and prefix tokens get none. The blocks are Eva's own (rotary q/k, separate q/v
biases, SwiGLU or GLU MLPs, scale norms, LayerScale gammas, gated attention, grouped-query heads),
run on packed tokens with varlen attention.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

from shapkern.engine.adapters.base import BlockPath, Output, Submodule, TimmAdapter, unsupported
from shapkern.engine.adapters.latent_pool import latent_attention_pool, latent_pool_unsupported
from shapkern.engine.adapters.timm_vit import embed_prefix_and_patches
from shapkern.engine.blocks import layer_scaled_block, packed_drop_path
from shapkern.packed import AttentionFn, PackPlan, first_tokens, planned_attention, segment_mean

__all__ = ["TimmEva", "compiled_eva_block_forward", "eva_block_forward", "packed_rope"]

SUPPORTED = (
    "Eva with global_pool 'token', 'avg' or 'map', class and register tokens, absolute and/or rotary "
    "position embeddings (rope_type 'cat', 'mixed', 'dinov3' or 'mrope'), pre- or post-norm EvaBlocks "
    "with EvaAttention or AttentionRope, dynamic_img_size=False"
)


def packed_rope(table: torch.Tensor, plan: PackPlan) -> torch.Tensor:
    """The rotary embedding of every packed token: (..., N, 2 Dh) per patch -> (T, 1 or H, 2 Dh).

    ``table`` is one block's embedding as timm's rope module gives it, (N, 2 Dh) shared by the heads
    or (H, N, 2 Dh), sin then cos. Prefix tokens get the identity rotation (sin 0, cos 1), which
    leaves them exactly as timm leaves them: unrotated.
    """
    half = table.shape[-1] // 2
    rows = table.index_select(-2, plan.token_patch.clamp(min=0))
    identity = torch.cat([rows.new_zeros(half), rows.new_ones(half)])
    rows = torch.where((plan.token_patch >= 0).unsqueeze(-1), rows, identity)
    return rows.unsqueeze(1) if rows.dim() == 2 else rows.transpose(0, 1)


def _qkv(attn: Submodule, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (T, H or kv heads, Dh) of EvaAttention or AttentionRope, with their bias layouts."""
    tokens = x.shape[0]
    if attn.qkv is None:
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        return tuple(proj(x).view(tokens, -1, attn.head_dim) for proj in projections)
    q_bias = getattr(attn, "q_bias", None)  # EvaAttention: q and v biases, k's a zero buffer
    if q_bias is None:
        qkv = attn.qkv(x)
    else:
        bias = torch.cat((q_bias, attn.k_bias, attn.v_bias))
        qkv = attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, attn.qkv.weight, bias)
    return qkv.view(tokens, 3, attn.num_heads, attn.head_dim).unbind(1)


def _eva_attention(
    attn: Submodule, x: torch.Tensor, plan: PackPlan, attention: AttentionFn, rope: torch.Tensor | None
) -> torch.Tensor:
    """EvaAttention or AttentionRope on packed tokens: (T, D) -> (T, D)."""
    from timm.layers import apply_rot_embed_cat

    q, k, v = _qkv(attn, x)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        half = getattr(attn, "rotate_half", False)
        q, k = apply_rot_embed_cat(q, rope, half=half), apply_rot_embed_cat(k, rope, half=half)
    groups = getattr(attn, "num_kv_groups", 1)  # grouped-query attention: kv head h serves heads h*g..
    if groups > 1:
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    # Under autocast, q/k norms and the rotation return fp32 while v keeps the autocast dtype.
    out = attention(q.to(v.dtype), k.to(v.dtype), v, plan.cu_seqlens, plan.max_seqlen, scale=attn.scale)
    out = attn.norm(out.reshape(x.shape[0], -1))
    if attn.gate is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def eva_block_forward(
    block: Submodule,
    x: torch.Tensor,
    plan: PackPlan,
    attention: AttentionFn = planned_attention,
    rope: torch.Tensor | None = None,
) -> torch.Tensor:
    """One EvaBlock or EvaBlockPostNorm on packed tokens: (T, D) -> (T, D); ``rope`` from
    :func:`packed_rope` (None: no rotary embedding)."""
    if not hasattr(block, "gamma_1"):  # EvaBlockPostNorm: the norms follow the branches
        attended = _eva_attention(block.attn, x, plan, attention, rope)
        x = x + packed_drop_path(block.drop_path1, block.norm1(attended), plan)
        return x + packed_drop_path(block.drop_path2, block.norm2(block.mlp(x)), plan)
    return layer_scaled_block(block, x, plan, lambda h: _eva_attention(block.attn, h, plan, attention, rope))


@cache
def compiled_eva_block_forward():
    # As compiled_block_forward: Inductor fuses the elementwise work (norms, SwiGLU, rotation, residuals).
    return torch.compile(eva_block_forward)


class TimmEva(TimmAdapter):
    """timm ``Eva``: tokens of absent patches dropped after the positional embedding, with their rope."""

    family = "timm Eva (EVA-02, RoPE ViT)"
    # Not timm's Block: rotary q/k, SwiGLU/GLU MLPs and scale norms are outside what the fused and
    # fp8 kernels compute (add + LayerNorm, Linear + exact GELU), so Eva runs plain or compiled.
    block_paths = ("plain", "compiled")

    @classmethod
    def claims(cls, model: Submodule) -> bool:
        from timm.models.eva import Eva

        return isinstance(model, Eva)

    def check(self) -> None:
        from timm.layers import AttentionRope
        from timm.models.eva import EvaAttention, EvaBlock, EvaBlockPostNorm

        model, attentions = self.model, (EvaAttention, AttentionRope)

        def fail(why: str) -> NotImplementedError:
            return unsupported(model, self.family, why, SUPPORTED)

        if model.global_pool not in ("token", "avg", "map"):
            raise fail(f"global_pool {model.global_pool!r}")
        if model.attn_pool is not None and (why := latent_pool_unsupported(model.attn_pool)) is not None:
            raise fail(why)
        if model.dynamic_img_size:
            raise fail("dynamic_img_size; create the model with dynamic_img_size=False")
        self._check_rope(fail)
        for block in model.blocks:
            if type(block) not in (EvaBlock, EvaBlockPostNorm) or type(block.attn) not in attentions:
                raise fail(f"block {type(block).__name__} with {type(block.attn).__name__}")
            if model.training and block.attn.attn_drop.p > 0:
                raise fail("attention dropout in train mode")
        if model.training and model.patch_drop is not None:
            raise fail("patch dropout in train mode")

    def _check_rope(self, fail) -> None:
        from timm.layers.pos_embed_sincos import (
            RotaryEmbeddingCat,
            RotaryEmbeddingDinoV3,
            RotaryEmbeddingMixed,
            RotaryEmbeddingMRope,
        )

        rope = self.model.rope
        if rope is None:
            return
        # Each gives the rope of every patch on dim -2, indexed by patch: what packed_rope gathers.
        known = (RotaryEmbeddingCat, RotaryEmbeddingMixed, RotaryEmbeddingDinoV3, RotaryEmbeddingMRope)
        if type(rope) not in known:
            raise fail(f"rotary embedding {type(rope).__name__}")
        if self.model.training and getattr(rope, "aug_active", False):
            raise fail("rotary coordinate augmentation in train mode")

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return embed_prefix_and_patches(self.model, images)

    def _rope_table(self) -> torch.Tensor | None:
        """The rope of every patch as timm's ``_pos_embed`` gets it: (N, 2 Dh), or (depth, H, N, 2 Dh)
        for mixed rope (one per block)."""
        rope = self.model.rope
        if rope is None:
            return None
        if hasattr(rope, "feat_shape"):
            return rope.get_embed()
        return rope.get_embed(shape=self.model.patch_embed.grid_size)

    def blocks(
        self, x: torch.Tensor, plan: PackPlan, attention: AttentionFn, path: BlockPath
    ) -> torch.Tensor:
        model = self.model
        x = model.norm_pre(model.pos_drop(x))
        table = self._rope_table()
        per_block = table is not None and model.rope_mixed
        # Shared rope is gathered once; mixed rope per block, so one block's (T, H, 2 Dh) is live at a time.
        rope = None if table is None or per_block else packed_rope(table, plan)
        block_forward = compiled_eva_block_forward() if path == "compiled" else eva_block_forward
        for index, block in enumerate(model.blocks):
            if per_block and table is not None:
                rope = packed_rope(table[index], plan)
            x = block_forward(block, x, plan, attention, rope)
        return x

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x)

    def pool_head(self, x: torch.Tensor, plan: PackPlan, output: Output) -> torch.Tensor:
        """timm's ``forward_head`` per row: Eva's pools see the prefix tokens ('map'), the class token
        ('token') or the kept patches ('avg')."""
        model = self.model
        if model.attn_pool is not None:
            pooled = latent_attention_pool(model.attn_pool, model.norm(x), plan)
        elif model.global_pool == "token":  # the final norm on the class tokens only
            pooled = model.norm(first_tokens(x, plan, 1)[:, 0])
        else:
            pooled = segment_mean(model.norm(x), plan)
        pooled = model.head_drop(model.fc_norm(pooled))
        return pooled if output == "pre_logits" else model.head(pooled)
