"""The self-explaining ViT of design.md §2: a timm ViT encoder and a per-patch Shapley head.

Φ(x) ∈ R^{N×K} holds every patch's Shapley value for every class; the prediction is their sum
f(x) = Σ_n Φ(x)_n, and the value of a coalition S under the same model is
v_x(S) = Σ_{n∈S} Φ(x_S)_n: the encoder run on the kept tokens only (the packed coalition engine),
then a segment sum of the per-token head outputs. v(∅) = 0, so efficiency holds by construction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from shapkern.coalitions import PackPlan
from shapkern.engine import check_packed_model, fused_coalition_forward, num_players, packed_block_forward
from shapkern.nn import segment_patch_sum

__all__ = ["HEADS", "ShapleyOutput", "ShapleyViT", "create_backbone"]

HEADS = ("linear", "block")


def _load_weights(backbone: nn.Module, path: str | os.PathLike) -> None:
    """Load a local timm checkpoint into ``backbone``, ignoring its classifier head."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    from timm.models.vision_transformer import checkpoint_filter_fn

    try:
        state = checkpoint_filter_fn(state, backbone)  # resamples position and patch embeddings
    except (KeyError, RuntimeError, ValueError, AttributeError) as exc:
        raise ValueError(
            f"checkpoint {path} does not fit the backbone {type(backbone).__name__}: {exc}"
        ) from exc
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    try:
        missing, unexpected = backbone.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(
            f"checkpoint {path} does not fit the backbone {type(backbone).__name__}: {exc}"
        ) from exc
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit the backbone {type(backbone).__name__}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


def create_backbone(name: str, *, checkpoint: str | os.PathLike | None = None, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=0, **kwargs)``, weights from a local file.

    Raises ValueError for a model name timm does not know.
    """
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8] if name else []
        raise ValueError(f"unknown model {name!r} (timm has no such architecture); similar: {close}")
    backbone = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if checkpoint is not None:
        _load_weights(backbone, checkpoint)
    return backbone


@dataclass
class ShapleyOutput:
    """Outputs of one packed pass over B images (full view) and their M coalitions.

    Attributes:
        phi: (B, N, K) Shapley values Φ(x) of the full images.
        logits: (B, K) f(x) = Σ_n Φ(x)_n.
        values: (B, M, K) v_x(S) for the M coalitions, or None when none were given.
    """

    phi: torch.Tensor
    logits: torch.Tensor
    values: torch.Tensor | None


class ShapleyViT(nn.Module):
    """A self-explaining ViT: Φ(x) (B, N, K) per patch, prediction f(x) = Σ_n Φ(x)_n.

    Args:
        backbone: an engine-supported timm VisionTransformer (its classifier is removed), or a
            timm model name, created with ``pretrained=False`` and ``backbone_kwargs``.
        num_classes: K.
        head: ``"linear"`` (LayerNorm + Linear per patch token) or ``"block"`` (one extra timm
            Block over the kept tokens first, as in ViT-Shapley).
        checkpoint: a local weights file for a backbone given by name.
        backbone_kwargs: passed to ``timm.create_model`` (img_size, patch_size, depth, ...).
    """

    def __init__(
        self,
        backbone: nn.Module | str,
        num_classes: int,
        head: str = "linear",
        *,
        checkpoint: str | os.PathLike | None = None,
        **backbone_kwargs,
    ):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if isinstance(backbone, str):
            backbone = create_backbone(backbone, checkpoint=checkpoint, **backbone_kwargs)
        elif checkpoint is not None or backbone_kwargs:
            raise ValueError("checkpoint and backbone kwargs apply only to a backbone given by name")
        check_packed_model(backbone)
        backbone.reset_classifier(0)
        self.backbone = backbone
        self.num_classes = num_classes
        self.head_type = head
        dim = backbone.embed_dim
        if head == "block":
            from timm.models.vision_transformer import Block

            self.head_block = Block(
                dim, num_heads=backbone.blocks[0].attn.num_heads, mlp_ratio=4.0, qkv_bias=True
            )
        else:
            self.head_block = None
        self.head_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    @property
    def num_players(self) -> int:
        """N, the number of patches."""
        return num_players(self.backbone)

    @property
    def num_prefix_tokens(self) -> int:
        return self.backbone.num_prefix_tokens

    def _head_packed(self, tokens: torch.Tensor, plan: PackPlan) -> torch.Tensor:
        """Per-token Φ on packed final-norm tokens: (T, D) -> (T, K) in float32."""
        if self.head_block is not None:
            tokens = packed_block_forward(self.head_block, tokens, plan)
        return self.head(self.head_norm(tokens)).float()

    def forward(self, images: torch.Tensor, coalitions: torch.Tensor | None = None, *, paired: bool = False):
        """Φ(x) and f(x), and v_x(S) when coalitions are given.

        Args:
            images: (B, C, H, W).
            coalitions: optional bool (B, M, N) or (M, N); then one packed pass of the engine
                computes everything (see :meth:`forward_coalitions`).
            paired: coalitions 2i and 2i+1 are complements.

        Returns:
            (phi (B, N, K), logits (B, K)), or (phi, logits, values (B, M, K)) with coalitions;
            all float32.
        """
        if coalitions is not None:
            out = self.forward_coalitions(images, coalitions, paired=paired)
            return out.phi, out.logits, out.values
        tokens = self.backbone.forward_features(images)
        if self.head_block is not None:
            tokens = self.head_block(tokens)
        phi = self.head(self.head_norm(tokens[:, self.num_prefix_tokens :])).float()
        return phi, phi.sum(dim=1)

    def coalition_values(
        self, images: torch.Tensor, coalitions: torch.Tensor, *, paired: bool = False
    ) -> torch.Tensor:
        """v_x(S) = Σ_{n∈S} Φ(x_S)_n for every image and coalition.

        Args:
            images: (B, C, H, W).
            coalitions: bool (B, M, N), or (M, N) shared by all images.
            paired: coalitions 2i and 2i+1 are complements (avoids a host sync).

        Returns:
            (B, M, K) float32; the empty coalition gives 0.
        """
        packed = fused_coalition_forward(self.backbone, images, coalitions, output="tokens", paired=paired)
        values = segment_patch_sum(self._head_packed(packed.tokens, packed.plan), packed.plan)
        return values.view(*packed.shape, -1)

    def forward_coalitions(
        self, images: torch.Tensor, coalitions: torch.Tensor | None = None, *, paired: bool = False
    ) -> ShapleyOutput:
        """Φ(x), f(x) and v_x(S) from one packed pass of the engine.

        The full and the empty coalition are prepended as one complementary pair, so the full
        view of every image runs in the same pass (and the same layout) as its coalitions.

        Args:
            images: (B, C, H, W).
            coalitions: bool (B, M, N) or None (then only Φ and f).
            paired: coalitions 2i and 2i+1 are complements.
        """
        batch, players = images.shape[0], self.num_players
        ends = torch.ones(batch, 2, players, dtype=torch.bool, device=images.device)
        ends[:, 1] = False
        if coalitions is not None:
            if coalitions.dim() == 2:
                coalitions = coalitions.unsqueeze(0).expand(batch, -1, -1)
            if coalitions.dim() != 3 or coalitions.shape[0] != batch or coalitions.dtype != torch.bool:
                raise ValueError(
                    f"coalitions must be bool (B, M, N) with B = {batch}, got {tuple(coalitions.shape)} "
                    f"{coalitions.dtype}"
                )
            ends = torch.cat([ends, coalitions], dim=1)
        packed = fused_coalition_forward(self.backbone, images, ends, output="tokens", paired=paired)
        plan = packed.plan
        phi_tokens = self._head_packed(packed.tokens, plan)
        rows = torch.arange(batch, device=images.device) * ends.shape[1]
        first = plan.cu_seqlens[rows].long() + self.num_prefix_tokens
        phi = phi_tokens[first.unsqueeze(1) + torch.arange(players, device=images.device)]
        values = segment_patch_sum(phi_tokens, plan).view(batch, ends.shape[1], -1)[:, 2:]
        return ShapleyOutput(
            phi=phi, logits=phi.sum(dim=1), values=values if coalitions is not None else None
        )
