"""open_clip's image towers on the packed engine: its own ``VisionTransformer`` (``model.visual`` of
CLIP models such as ViT-B-32) and ``TimmModel`` towers whose timm trunk the engine runs.

The output is the projected image embedding (``pooled @ proj``); ``output="pre_logits"`` gives the
pooled features before the projection. Importing this module does not import open_clip: a model is
claimed by the module and name of its class.
"""

from __future__ import annotations

from functools import cache

import torch

from shapkern.engine.adapters.base import BlockPath, ModelAdapter, Output, Submodule, unsupported
from shapkern.engine.adapters.multihead import multihead_unsupported, packed_self_attention
from shapkern.packed import AttentionFn, PackPlan, first_tokens, segment_mean

__all__ = ["OpenClipTimmModel", "OpenClipVisionTransformer"]

SUPPORTED = (
    "open_clip.transformer.VisionTransformer of ResidualAttentionBlocks (nn.MultiheadAttention, "
    "LayerScale or none), pool_type 'tok' or 'avg', with or without ln_pre and final_ln_after_pool, "
    "learnable or sin-cos positions, at its image size; patch dropout only in eval mode; no "
    "attentional pooling (CoCa) or custom blocks (qk_norm, scaled cosine attention, scale_* options)"
)
SUPPORTED_TIMM = "open_clip.timm_model.TimmModel with a trunk the packed engine runs and a linear or MLP head"


def _is(model: Submodule, module: str, name: str) -> bool:
    return type(model).__module__ == module and type(model).__name__ == name


def _block_forward(block: Submodule, x: torch.Tensor, plan: PackPlan, attention: AttentionFn) -> torch.Tensor:
    """One open_clip ResidualAttentionBlock on packed tokens: (T, D) -> (T, D)."""
    x = x + block.ls_1(packed_self_attention(block.attn, block.ln_1(x), plan, attention))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


@cache
def _compiled_block_forward():
    # As timm's compiled blocks (engine/blocks.py): blocks share the code, their parameters are inputs.
    return torch.compile(_block_forward)


class OpenClipVisionTransformer(ModelAdapter):
    """open_clip ``VisionTransformer``: tokens of absent patches are dropped after the positional
    embedding, where its patch dropout would drop them."""

    family = "open_clip VisionTransformer"

    @classmethod
    def claims(cls, model: Submodule) -> bool:
        return _is(model, "open_clip.transformer", "VisionTransformer")

    def check(self) -> None:
        model = self.model

        def fail(why: str) -> NotImplementedError:
            return unsupported(model, self.family, why, SUPPORTED)

        if model.attn_pool is not None:
            raise fail("attentional pooling (attn_pool, as CoCa towers)")
        if model.pool_type not in ("tok", "avg"):
            raise fail(f"pool_type {model.pool_type!r}")
        if model.training and getattr(model.patch_dropout, "prob", 0.0) > 0:
            raise fail("patch dropout in train mode")
        for block in model.transformer.resblocks:
            if not _is(block, "open_clip.transformer", "ResidualAttentionBlock") or hasattr(block, "ln_1_kv"):
                raise fail(f"block {type(block).__name__} (custom or cross-attention blocks)")
            why = multihead_unsupported(block.attn)
            if why is not None:
                raise fail(why)

    @property
    def num_players(self) -> int:
        return self.model.grid_size[0] * self.model.grid_size[1]

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    @property
    def width(self) -> int:
        return self.model.transformer.width

    @property
    def depth(self) -> int:
        return len(self.model.transformer.resblocks)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """open_clip's ``_embeds`` up to its patch dropout (the identity in eval mode), then ln_pre, which
        is per token."""
        model = self.model
        size = tuple(images.shape[-2:])
        if size != tuple(model.image_size):
            raise ValueError(
                f"the open_clip VisionTransformer takes {model.image_size[0]}x{model.image_size[1]} images, "
                f"got {size[0]}x{size[1]}: resize the images"
            )
        x = model.conv1(images).flatten(2).transpose(1, 2)
        cls = model.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + model.positional_embedding.to(x.dtype)
        return model.ln_pre(x)

    def blocks(
        self, x: torch.Tensor, plan: PackPlan, attention: AttentionFn, path: BlockPath
    ) -> torch.Tensor:
        block_forward = _compiled_block_forward() if path == "compiled" else _block_forward
        for block in self.model.transformer.resblocks:
            x = block_forward(block, x, plan, attention)
        return x

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.ln_post(x)

    def pool_head(self, x: torch.Tensor, plan: PackPlan, output: Output) -> torch.Tensor:
        model = self.model
        if model.pool_type == "tok":  # ln_post is per token: on the class token only
            pooled = model.ln_post(first_tokens(x, plan, 1)[:, 0])
        elif model.final_ln_after_pool:
            pooled = model.ln_post(segment_mean(x, plan))
        else:
            pooled = segment_mean(model.ln_post(x), plan)
        if output == "pre_logits" or model.proj is None:
            return pooled
        return pooled @ model.proj


class OpenClipTimmModel(ModelAdapter):
    """open_clip ``TimmModel``: its timm trunk on the packed engine (through the trunk's own adapter),
    then its head (dropout and a linear or MLP projection) per row. ``output="pre_logits"`` gives the
    trunk's pre-logits."""

    family = "open_clip TimmModel"

    @classmethod
    def claims(cls, model: Submodule) -> bool:
        return _is(model, "open_clip.timm_model", "TimmModel")

    def check(self) -> None:
        from shapkern.engine.adapters import adapter_for  # the registry imports this module

        model = self.model
        if "pool" in model.head._modules:
            raise unsupported(
                model, self.family, "an attention-pooling head (abs_attn, rot_attn)", SUPPORTED_TIMM
            )
        try:
            self.trunk = adapter_for(model.trunk)
        except NotImplementedError as error:
            raise unsupported(model, self.family, f"its trunk: {error}", SUPPORTED_TIMM) from error

    @property
    def num_players(self) -> int:
        return self.trunk.num_players

    @property
    def num_prefix_tokens(self) -> int:
        return self.trunk.num_prefix_tokens

    @property
    def width(self) -> int:
        return self.trunk.width

    @property
    def depth(self) -> int:
        return self.trunk.depth

    def check_block_path(self, path: BlockPath, images: torch.Tensor) -> None:
        self.trunk.check_block_path(path, images)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk.embed(images)

    def blocks(
        self, x: torch.Tensor, plan: PackPlan, attention: AttentionFn, path: BlockPath
    ) -> torch.Tensor:
        return self.trunk.blocks(x, plan, attention, path)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.final_norm(x)

    def pool_head(self, x: torch.Tensor, plan: PackPlan, output: Output) -> torch.Tensor:
        pooled = self.trunk.pool_head(x, plan, output)  # the trunk's own head, if it projects
        return pooled if output == "pre_logits" else self.model.head(pooled)
