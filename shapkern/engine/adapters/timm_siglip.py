"""timm's VisionTransformer with latent attention pooling (``global_pool='map'``) on the packed engine:
SigLIP and SigLIP 2 image towers, the ``*_map`` ViTs. Everything before the pool is timm's standard
ViT (:class:`TimmViT`, with its fused and fp8 block paths); the pool attends to each row's kept tokens."""

from __future__ import annotations

import torch

from shapkern.engine.adapters.base import Output, Submodule
from shapkern.engine.adapters.latent_pool import latent_attention_pool, latent_pool_unsupported
from shapkern.engine.adapters.timm_vit import TimmViT
from shapkern.packed import PackPlan

__all__ = ["TimmViTLatentPool"]


class TimmViTLatentPool(TimmViT):
    """timm ``VisionTransformer`` with ``global_pool='map'`` (``AttentionPoolLatent``)."""

    family = "timm VisionTransformer with attention pooling 'map' (SigLIP)"
    supported = (
        "VisionTransformer with global_pool 'map' (one or more latent queries, pool_type 'token' or 'avg', "
        "no pool position embedding), with or without prefix tokens, otherwise as timm VisionTransformer"
    )

    @classmethod
    def claims(cls, model: Submodule) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer) and model.global_pool == "map"

    def check_pool(self) -> None:
        why = latent_pool_unsupported(self.model.attn_pool)
        if why is not None:
            raise self._fail(why)

    def pool_head(self, x: torch.Tensor, plan: PackPlan, output: Output) -> torch.Tensor:
        """timm's ``forward_head`` on each row's kept tokens: the pool sees the patch tokens, and the
        prefix tokens too with ``pool_include_prefix``."""
        model = self.model
        pools_all = model.pool_include_prefix or model.num_prefix_tokens == 0
        pooled_tokens = None if pools_all else plan.token_patch >= 0
        pooled = latent_attention_pool(model.attn_pool, model.norm(x), plan, pooled_tokens)
        pooled = model.head_drop(model.fc_norm(pooled))
        return pooled if output == "pre_logits" else model.head(pooled)
