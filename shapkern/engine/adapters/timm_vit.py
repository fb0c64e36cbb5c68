"""timm's VisionTransformer family on the packed engine: ViT, DeiT (distilled), DeiT 3, DINOv2,
CLIP image towers, FlexiViT, hybrid R+ViT, with token or average pooling."""

from __future__ import annotations

import torch
from torch import nn

from shapkern.engine.adapters.base import BlockPath, Output, Submodule, TimmAdapter, unsupported
from shapkern.engine.blocks import (
    compiled_block_forward,
    fused_blocks_forward,
    packed_block_forward,
    supports_fused_blocks,
)
from shapkern.engine.fp8 import check_fp8_blocks, fp8_blocks_forward
from shapkern.packed import AttentionFn, PackPlan, first_tokens, segment_mean

__all__ = ["TimmViT", "embed_prefix_and_patches"]

SUPPORTED = (
    "VisionTransformer and VisionTransformerDistilled (DeiT) with global_pool 'token' or 'avg' ('map' "
    "has its own adapter), "
    "class/register/distillation tokens, no_embed_class, qk_norm, LayerScale, any depth, width and "
    "patch size, built from timm's Block and Attention layers"
)


def embed_prefix_and_patches(model: Submodule, images: torch.Tensor) -> torch.Tensor:
    """timm's ``_pos_embed`` (VisionTransformer, Eva) without its dropout, which runs per coalition
    after packing: (B, C, H, W) -> (B, P + N, D)."""
    x = model.patch_embed(images)
    # Prefix order as timm builds it: class, distillation (DeiT), register tokens.
    names = ("cls_token", "dist_token", "reg_token")
    prefix = [getattr(model, name) for name in names if getattr(model, name, None) is not None]
    prefix = [token.expand(x.shape[0], -1, -1) for token in prefix]
    if model.pos_embed is None:
        return torch.cat(prefix + [x], dim=1)
    if model.no_embed_class:
        return torch.cat(prefix + [x + model.pos_embed], dim=1)
    return torch.cat(prefix + [x], dim=1) + model.pos_embed


class TimmViT(TimmAdapter):
    """timm ``VisionTransformer``: tokens of absent patches are dropped after the positional embedding."""

    family = "timm VisionTransformer"
    supported = SUPPORTED
    block_paths = ("plain", "compiled", "fused", "fp8")

    @classmethod
    def claims(cls, model: Submodule) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        # Attention pooling 'map' is TimmViTLatentPool's (timm_siglip.py).
        return isinstance(model, VisionTransformer) and model.global_pool != "map"

    def _fail(self, why: str) -> NotImplementedError:
        return unsupported(self.model, self.family, why, self.supported)

    def check_pool(self) -> None:
        """Raise for a pooling :meth:`pool_head` does not compute."""
        model, fail = self.model, self._fail
        if model.global_pool not in ("token", "avg") or model.attn_pool is not None:
            raise fail(f"global_pool {model.global_pool!r}")
        if model.global_pool == "avg" and model.pool_include_prefix:
            raise fail("average pooling that includes prefix tokens")

    def check(self) -> None:
        from timm.layers import Attention
        from timm.models.vision_transformer import Block

        model, fail = self.model, self._fail
        self.check_pool()
        if model.dynamic_img_size:
            raise fail("dynamic_img_size")
        for block in model.blocks:
            if type(block) is not Block or type(block.attn) is not Attention:
                raise fail(f"block {type(block).__name__} with {type(block.attn).__name__}")
            if model.training and block.attn.attn_drop.p > 0:
                raise fail("attention dropout in train mode")
        if model.training and not isinstance(model.patch_drop, nn.Identity):
            raise fail("PatchDropout in train mode")

    def check_block_path(self, path: BlockPath, images: torch.Tensor) -> None:
        super().check_block_path(path, images)
        if path == "fused" and not supports_fused_blocks(self.model):
            raise NotImplementedError(
                f"blocks='fused' needs timm Blocks with affine LayerNorms, an Mlp of Linear + exact GELU "
                f"and LayerScale or none; {type(self.model).__name__} has others. Use blocks='plain'."
            )
        if path == "fp8":
            check_fp8_blocks(self.model, images)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return embed_prefix_and_patches(self.model, images)

    def blocks(
        self, x: torch.Tensor, plan: PackPlan, attention: AttentionFn, path: BlockPath
    ) -> torch.Tensor:
        model = self.model
        x = model.norm_pre(model.pos_drop(x))
        if path == "fused":
            return fused_blocks_forward(model, x, plan, attention)
        if path == "fp8":
            return fp8_blocks_forward(model, x, plan, attention)
        block_forward = compiled_block_forward() if path == "compiled" else packed_block_forward
        for block in model.blocks:
            x = block_forward(block, x, plan, attention)
        return x

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x)

    def pool_head(self, x: torch.Tensor, plan: PackPlan, output: Output) -> torch.Tensor:
        model, prefix = self.model, self.model.num_prefix_tokens
        if model.global_pool == "token":  # the final norm on the prefix tokens only
            pooled = model.norm(first_tokens(x, plan, prefix))
        else:
            x = model.norm(x)
            pooled = torch.cat([first_tokens(x, plan, prefix), segment_mean(x, plan).unsqueeze(1)], dim=1)
        return model.forward_head(pooled, pre_logits=output == "pre_logits")
