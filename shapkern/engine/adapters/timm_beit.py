"""timm's Beit family on the packed engine: BEiT and BEiT v2 (beit_*, beitv2_*), with a relative
position bias per block, one shared by all blocks, both or none, absolute position embeddings or
none, layer scale, average or class-token pooling.

The relative position bias is a (H, L, L) matrix over the model's full sequence, L = 1 + N (class
token, then the patches in grid order). A coalition keeps some of those positions, so each pair of
kept tokens takes the bias of its two positions: varlen attention looks it up through every packed
token's position (``bias_index``), in the Triton kernels on CUDA and in the PyTorch reference.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

from shapkern.engine.adapters.base import BlockPath, Output, Submodule, TimmAdapter, unsupported
from shapkern.engine.blocks import layer_scaled_block
from shapkern.packed import AttentionFn, PackPlan, first_tokens, segment_mean

__all__ = ["TimmBeit", "beit_block_forward"]

SUPPORTED = (
    "Beit with global_pool 'avg' or 'token', a relative position bias per block and/or shared, "
    "absolute position embeddings or none, layer scale, Mlp or SwiGLU, built from timm's beit Block "
    "and Attention layers"
)


def _position_bias(attn: Submodule, shared: torch.Tensor | None) -> torch.Tensor | None:
    """The bias (H, L, L) timm's Attention adds to the scores over the full sequence: its own
    relative position bias, plus the model's shared one; None without either."""
    own = attn._get_rel_pos_bias()[0] if attn.relative_position_bias_table is not None else None
    if own is None or shared is None:
        return shared if own is None else own
    return own + shared


def _attention(
    attn: Submodule,
    x: torch.Tensor,
    plan: PackPlan,
    attention: AttentionFn,
    bias: torch.Tensor | None,
    bias_index: torch.Tensor,
) -> torch.Tensor:
    """timm beit Attention on packed tokens: (T, D) -> (T, D)."""
    tokens = x.shape[0]
    if attn.q_bias is None:
        qkv = attn.qkv(x)
    else:  # the key has no bias: a zero buffer
        qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        if attn.qkv_bias_separate:
            qkv = attn.qkv(x) + qkv_bias
        else:
            qkv = F.linear(x, weight=attn.qkv.weight, bias=qkv_bias)
    q, k, v = qkv.view(tokens, 3, attn.num_heads, -1).unbind(1)
    extra = {} if bias is None else {"bias": bias, "bias_index": bias_index}
    out = attention(q, k, v, plan.cu_seqlens, plan.max_seqlen, scale=attn.scale, **extra)
    return attn.proj_drop(attn.proj(out.reshape(tokens, -1)))


def beit_block_forward(
    block: Submodule,
    x: torch.Tensor,
    plan: PackPlan,
    attention: AttentionFn,
    bias: torch.Tensor | None,
    bias_index: torch.Tensor,
) -> torch.Tensor:
    """One timm beit Block on packed tokens: (T, D) -> (T, D). ``bias`` (H, L, L) or None is the
    block's position bias over the full sequence; ``bias_index`` (T,) int32 each token's position."""
    return layer_scaled_block(
        block, x, plan, lambda h: _attention(block.attn, h, plan, attention, bias, bias_index)
    )


@cache
def _compiled_block_forward():
    # As for timm's ViT blocks (engine/blocks.py): Inductor fuses the memory-bound work between the
    # GEMMs; the attention stays one custom op, with the bias a graph input.
    return torch.compile(beit_block_forward)


class TimmBeit(TimmAdapter):
    """timm ``Beit``: tokens of absent patches are dropped after the positional embedding, and the
    relative position biases are looked up at the kept positions."""

    family = "timm Beit"

    @classmethod
    def claims(cls, model: Submodule) -> bool:
        from timm.models.beit import Beit

        return isinstance(model, Beit)

    def check(self) -> None:
        from timm.models.beit import Attention, Block

        model = self.model

        def fail(why: str) -> NotImplementedError:
            return unsupported(model, self.family, why, SUPPORTED)

        if model.global_pool not in ("avg", "token"):
            raise fail(f"global_pool {model.global_pool!r}")
        grid = tuple(model.patch_embed.grid_size)
        windows = [model.rel_pos_bias.window_size] if model.rel_pos_bias is not None else []
        for block in model.blocks:
            if type(block) is not Block or type(block.attn) is not Attention:
                raise fail(f"block {type(block).__name__} with {type(block.attn).__name__}")
            if model.training and block.attn.attn_drop.p > 0:
                raise fail("attention dropout in train mode")
            if block.attn.window_size is not None:
                windows.append(block.attn.window_size)
        for window in windows:  # the bias positions must be the class token and the patch grid
            if tuple(window) != grid:
                raise fail(f"a relative position window {tuple(window)} unlike the patch grid {grid}")

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Mirrors ``Beit.forward_features`` up to its position dropout, which runs per coalition
        after packing."""
        model = self.model
        x = model.patch_embed(images)
        x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x if model.pos_embed is None else x + model.pos_embed

    def blocks(
        self, x: torch.Tensor, plan: PackPlan, attention: AttentionFn, path: BlockPath
    ) -> torch.Tensor:
        model = self.model
        x = model.pos_drop(x)
        # A token's position in the full sequence: the class token 0, patch n at 1 + n.
        bias_index = (plan.token_patch + plan.num_prefix_tokens).to(torch.int32)
        shared = model.rel_pos_bias() if model.rel_pos_bias is not None else None
        block_forward = _compiled_block_forward() if path == "compiled" else beit_block_forward
        for block in model.blocks:
            x = block_forward(block, x, plan, attention, _position_bias(block.attn, shared), bias_index)
        return x

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x)

    def pool_head(self, x: torch.Tensor, plan: PackPlan, output: Output) -> torch.Tensor:
        """timm's ``forward_head`` on (class token, mean of the kept patch tokens) per row: 'avg'
        pooling takes the mean (zeros for a row without patches, where timm's mean over no token
        is NaN), 'token' the class token."""
        model = self.model
        if model.global_pool == "token":  # the final norm on the class tokens only
            pooled = model.norm(first_tokens(x, plan, 1))
        else:
            x = model.norm(x)  # an Identity when fc_norm normalises the pooled features
            pooled = torch.cat([first_tokens(x, plan, 1), segment_mean(x, plan).unsqueeze(1)], dim=1)
        return model.forward_head(pooled, pre_logits=output == "pre_logits")
