"""What the benchmarks need of each model family: its own forward on the kept tokens (the oracle),
and the full-sequence layouts the alternatives mask.

Families (timm classes; shapkern's adapters are never used here, so that the oracle and the
alternatives stay independent of the engine they check):

- ``VisionTransformer`` (class-token, average or latent attention pooling: ViT, DeiT, SigLIP),
- ``Eva`` (EVA-02, RoPE ViTs: rotary position embedding inside attention),
- ``Beit`` (a relative position bias per block and/or shared by all blocks).

:func:`dropped_reference` is the game's definition (docs/design.md, "The game"): the model's own
forward on every (image, coalition) with the absent patch tokens removed after the positional
embedding, one coalition at a time. Tests of the engine's adapters use it as their oracle too.

The alternatives of benchmarks/baselines.py run full sequences with the absent tokens masked out
of attention instead: :func:`key_masked_features` (one row per coalition), :func:`pair_blocks`
(two complementary coalitions per row) and :func:`masked_head` (each row's pooling over its kept
tokens); each ``*_unavailable`` function says why a family cannot run one of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

__all__ = [
    "beit_kept_tokens",
    "dropped_reference",
    "family",
    "kept_patches",
    "key_masked_features",
    "masked_head",
    "pair_blocks",
    "pairs_unavailable",
    "timm_block_unavailable",
]


def family(model: nn.Module) -> str:
    """``"vit"``, ``"eva"`` or ``"beit"``: the timm class ``model`` is built from; ValueError else."""
    from timm.models.beit import Beit
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    for name, cls in (("vit", VisionTransformer), ("eva", Eva), ("beit", Beit)):
        if isinstance(model, cls):
            return name
    raise ValueError(
        f"benchmarks know timm VisionTransformer, Eva and Beit models, not {type(model).__name__}"
    )


# -- the oracle: the model's own forward on the kept tokens --------------------------------------


class _KeepPatches(nn.Module):
    """Stands in for timm's patch dropout: keeps the prefix tokens and the ``patches``; for Eva also
    returns their indices, so that Eva's own ``_pos_embed`` gathers the kept patches' rope."""

    def __init__(self, patches: torch.Tensor, prefix: int, with_indices: bool):
        super().__init__()
        self.patches, self.prefix, self.with_indices = patches, prefix, with_indices

    def forward(self, x):
        kept = torch.cat([x[:, : self.prefix], x[:, self.prefix + self.patches]], dim=1)
        return (kept, self.patches.expand(x.shape[0], -1)) if self.with_indices else kept


@contextmanager
def beit_kept_tokens(model: nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """While timm's own ``Beit.forward_features`` runs, keep only the tokens at ``positions`` (class
    token 0, patch n at 1 + n): they are selected right after the positional embedding (the output
    of ``pos_drop``), and every relative position bias (L, L) is sliced to those positions, the
    shared one (the output of ``rel_pos_bias``) and each block's (``Attention._get_rel_pos_bias``)."""
    with ExitStack() as stack:
        stack.callback(model.pos_drop.register_forward_hook(lambda m, i, out: out[:, positions]).remove)
        if model.rel_pos_bias is not None:
            shared = model.rel_pos_bias.register_forward_hook(
                lambda m, i, out: out[:, positions][:, :, positions]
            )
            stack.callback(shared.remove)
        for block in model.blocks:
            attn = block.attn
            if attn.relative_position_bias_table is not None:
                full = type(attn)._get_rel_pos_bias.__get__(attn)
                attn._get_rel_pos_bias = lambda full=full: full()[:, :, positions][:, :, :, positions]
                stack.callback(delattr, attn, "_get_rel_pos_bias")
        yield


@contextmanager
def kept_patches(model: nn.Module, patches: torch.Tensor) -> Iterator[None]:
    """While ``model.forward_features`` runs, its sequence holds the prefix tokens and the patch tokens
    ``patches`` (int64 (k,), ascending) only, removed right after the positional embedding."""
    kind = family(model)
    if kind == "beit":
        positions = torch.cat([patches.new_zeros(1), 1 + patches])
        with beit_kept_tokens(model, positions):
            yield
        return
    saved = model.patch_drop
    model.patch_drop = _KeepPatches(patches, model.num_prefix_tokens, with_indices=kind == "eva")
    try:
        yield
    finally:
        model.patch_drop = saved


def _pool_sees_prefix(model: nn.Module) -> bool:
    """Whether the model's latent attention pool, if any, attends to the prefix tokens too (Eva's
    always does, a VisionTransformer's with ``pool_include_prefix``); True without such a pool."""
    if getattr(model, "attn_pool", None) is None:
        return True
    return model.num_prefix_tokens > 0 and getattr(model, "pool_include_prefix", True)


def dropped_reference(
    model: nn.Module, images: torch.Tensor, coalitions: torch.Tensor, output: str = "logits"
) -> torch.Tensor:
    """The model's own forward on every (image, coalition) with the absent patch tokens removed.

    One coalition at a time, through :func:`kept_patches`. A coalition without patches under
    average pooling pools zeros (the engine's convention; timm's mean over no token is NaN).

    Args:
        model: a timm VisionTransformer, Eva or Beit.
        images: (B, C, H, W).
        coalitions: bool (B, M, N).
        output: ``"logits"`` or ``"pre_logits"`` (the pooled features after ``fc_norm``).

    Returns:
        (B, M, K) logits or (B, M, D) pre-logits.
    """
    rows = []
    for image, masks in zip(images, coalitions, strict=True):
        for mask in masks:
            patches = mask.nonzero().view(-1)
            if patches.numel() == 0 and not _pool_sees_prefix(model):
                raise ValueError("dropped_reference: a latent attention pool over no token has no value")
            with kept_patches(model, patches):
                feats = model.forward_features(image[None])
            if patches.numel() == 0 and model.global_pool == "avg":
                feats = torch.cat([feats, feats.new_zeros(1, 1, feats.shape[-1])], dim=1)
            rows.append(model.forward_head(feats, pre_logits=output == "pre_logits"))
    return torch.cat(rows).view(*coalitions.shape[:2], -1)


# -- full sequences with the absent tokens masked ------------------------------------------------


def _beit_features(model: nn.Module, images: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``Beit.forward_features`` with ``bias`` (R, 1, L, L or 1) added to every block's attention
    scores, next to the model's shared relative position bias: Beit's blocks take an additive
    score bias, not a mask."""
    x = model.patch_embed(images)
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    if model.pos_embed is not None:
        x = x + model.pos_embed
    x = model.pos_drop(x)
    if model.rel_pos_bias is not None:
        bias = bias + model.rel_pos_bias().to(bias.dtype)
    for block in model.blocks:
        x = block(x, shared_rel_pos_bias=bias)
    return model.norm(x)


def key_masked_features(model: nn.Module, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Final-norm token features (R, L, D) of full sequences in which every query sees only the kept
    keys: images (R, C, H, W), keep bool (R, L) over [prefix tokens, N patches]."""
    if family(model) != "beit":
        return model.forward_features(images, attn_mask=keep[:, None, None, :])
    bias = torch.zeros(keep.shape, dtype=images.dtype, device=images.device).masked_fill(~keep, float("-inf"))
    return _beit_features(model, images, bias[:, None, None, :])


def pairs_unavailable(model: nn.Module) -> str | None:
    """Why complementary coalitions cannot share one row of ``model``'s blocks, or None."""
    if family(model) == "beit":
        return (
            "Beit's relative position bias is a fixed (1 + N)² table per block: a row of two "
            "coalitions holds a second class token it has no bias for"
        )
    return None


def timm_block_unavailable(model: nn.Module) -> str | None:
    """Why a method written for timm's ViT ``Block`` (its attention rebuilt around another kernel)
    cannot run ``model``'s blocks, or None."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    for block in model.blocks:
        if type(block) is not Block or type(block.attn) is not Attention:
            found = f"{type(block).__module__}.{type(block).__name__}"
            return f"written for timm's ViT Block; {type(model).__name__} has {found}"
    return None


def _pair_rope(model: nn.Module, rope: torch.Tensor) -> torch.Tensor:
    """Eva's rope (…, N, 2 Dh') for a pair row: Eva rotates every token after its first P, so the
    second coalition's P prefix tokens get the identity rotation (sin 0, cos 1; timm's sin|cos
    layout) ahead of the patches' rope."""
    sin, cos = rope[..., : model.num_prefix_tokens, :].chunk(2, dim=-1)
    return torch.cat([torch.cat([torch.zeros_like(sin), torch.ones_like(cos)], dim=-1), rope], dim=-2)


def pair_blocks(
    model: nn.Module, x: torch.Tensor, rope: torch.Tensor | None, mask: torch.Tensor
) -> torch.Tensor:
    """``model``'s blocks on pair rows x (R, 2P + N, D) under the attention mask (R, 1, L, L);
    ``rope``: Eva's rope of the N patches from its ``_pos_embed`` (None for other families)."""
    if rope is None:
        for block in model.blocks:
            x = block(x, attn_mask=mask)
        return x
    rope = _pair_rope(model, rope)
    for index, block in enumerate(model.blocks):  # mixed rope: one table per block
        x = block(x, rope=rope[index] if model.rope_mixed else rope, attn_mask=mask)
    return x


def masked_head(model: nn.Module, x: torch.Tensor, kept: torch.Tensor, prefix: slice) -> torch.Tensor:
    """timm's pooling and head on each row's own tokens: (R, L, D) final-norm features -> (R, K).

    Args:
        model: a timm VisionTransformer, Eva or Beit with global_pool 'token', 'avg' or 'map'.
        x: rows whose last N tokens are the patches.
        kept: bool (R, N), the row's kept patches.
        prefix: the positions of the row's own P prefix tokens in x.
    """
    players, own = kept.shape[1], x[:, prefix]
    patches = x[:, -players:]
    pool = getattr(model, "attn_pool", None)
    if pool is not None:  # latent attention pool: timm's own, its keys masked
        if _pool_sees_prefix(model):
            patches, kept = torch.cat([own, patches], 1), torch.cat([kept.new_ones(own.shape[:2]), kept], 1)
        pooled = pool(patches, attn_mask=kept[:, None, None, :])
        return model.head(model.head_drop(model.fc_norm(pooled)))
    if model.global_pool == "token":  # timm's own forward_head on the row's prefix tokens
        return model.forward_head(own)
    if model.global_pool != "avg" or getattr(model, "pool_include_prefix", False):
        raise NotImplementedError(f"masked_head: global_pool {model.global_pool!r} (with prefix tokens)")
    weights = kept.to(x.dtype).unsqueeze(-1)
    mean = (patches * weights).sum(1) / weights.sum(1).clamp(min=1)
    # timm's own forward_head on [prefix tokens, mean of the kept patches] averages what follows the prefix.
    return model.forward_head(torch.cat([own, mean.unsqueeze(1)], dim=1))
