"""The self-explaining ViT (docs/design.md, "The self-explaining model"): a timm ViT encoder and a
per-patch Shapley head.

Φ(x) ∈ R^{N×K} holds every patch's Shapley value for every class; the prediction is their sum
f(x) = Σ_n Φ(x)_n, and the value of a coalition S under the same model is
v_x(S) = Σ_{n∈S} Φ(x_S)_n: the encoder run on the kept tokens only (the packed coalition engine),
then a segment sum of the per-token head outputs. v(∅) = 0, so efficiency holds by construction.
"""

from __future__ import annotations

import os
from typing import Any, Literal, NamedTuple, get_args

import torch
from torch import nn

from shapkern._deprecation import renamed_arguments
from shapkern.checkpoint import CheckpointError, load_checkpoint
from shapkern.engine import (
    CoalitionForward,
    Precision,
    check_images,
    check_packed_model,
    num_players,
    packed_block_forward,
)
from shapkern.models.backbones import create_backbone
from shapkern.packed import PackPlan, segment_patch_sum

__all__ = ["HEADS", "Head", "ShapleyOutput", "ShapleyViT"]

# The Shapley head: LayerNorm + Linear per patch token, or one more transformer block first.
Head = Literal["linear", "block"]
HEADS: tuple[Head, ...] = get_args(Head)


class ShapleyOutput(NamedTuple):
    """What a :class:`ShapleyViT` returns, float32.

    Attributes:
        phi: (B, N, K) Shapley values Φ(x) of the full images.
        logits: (B, K) f(x) = Σ_n Φ(x)_n.
        values: (B, M, K) v_x(S) of the M coalitions, or None when none were given.
    """

    phi: torch.Tensor
    logits: torch.Tensor
    values: torch.Tensor | None = None


class ShapleyViT(nn.Module):
    """A self-explaining ViT: Φ(x) (B, N, K) per patch, prediction f(x) = Σ_n Φ(x)_n.

    Args:
        backbone: an engine-supported timm VisionTransformer (its classifier is removed), or a
            timm model name, created with ``backbone_kwargs``.
        num_classes: K.
        head: ``"linear"`` (LayerNorm + Linear per patch token) or ``"block"`` (one extra timm
            Block over the kept tokens first, as in ViT-Shapley).
        checkpoint: a local weights file for a backbone given by name.
        pretrained: load timm's pretrained weights for a backbone given by name (``arch.tag`` picks
            which; see :func:`~shapkern.models.create_backbone`).
        backbone_kwargs: passed to ``timm.create_model`` (img_size, patch_size, depth, ...).
    """

    backbone: Any  # a timm ViT, read by attribute (nn.Module would type each read Tensor | Module)

    def __init__(
        self,
        backbone: nn.Module | str,
        num_classes: int,
        head: Head = "linear",
        *,
        checkpoint: str | os.PathLike | None = None,
        pretrained: bool = False,
        **backbone_kwargs,
    ):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        # What rebuilds this model from a checkpoint (a backbone given by name only). The weights'
        # source (checkpoint, pretrained) is left out: a rebuilt model loads the checkpoint's own
        # weights, so from_checkpoint never reads the original file nor downloads.
        self.arch: dict | None = None
        if isinstance(backbone, str):
            self.arch = {"backbone": backbone, "num_classes": num_classes, "head": head, **backbone_kwargs}
            backbone = create_backbone(
                backbone, checkpoint=checkpoint, pretrained=pretrained, **backbone_kwargs
            )
        elif checkpoint is not None or pretrained or backbone_kwargs:
            raise ValueError(
                "checkpoint, pretrained and backbone kwargs apply only to a backbone given by name"
            )
        check_packed_model(backbone)
        _drop_pooling_stage(backbone)
        self.backbone = backbone
        self.backbone.reset_classifier(0)
        self.num_classes = num_classes
        self.head_type = head
        dim = self.backbone.embed_dim
        self.head_block: nn.Module | None = None
        if head == "block":
            from timm.models.vision_transformer import Block

            heads = self.backbone.blocks[0].attn.num_heads
            self.head_block = Block(dim, num_heads=heads, mlp_ratio=4.0, qkv_bias=True)
        self.head_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, map_location="cpu") -> ShapleyViT:
        """The model saved in a ``shapkern train`` checkpoint (read safely, no code runs), in eval mode."""
        return cls.from_state(load_checkpoint(str(path), map_location=map_location), str(path)).to(
            map_location
        )

    @classmethod
    def from_state(cls, state: dict, source: str = "the checkpoint") -> ShapleyViT:
        """The model of a loaded checkpoint dict (its ``"arch"`` and ``"model"`` entries), in eval mode."""
        arch = state.get("arch")
        if not isinstance(arch, dict) or "backbone" not in arch or not isinstance(state.get("model"), dict):
            raise CheckpointError(
                f"{source} is not a checkpoint written by `shapkern train` "
                "(it has no 'arch' and 'model' entries)"
            )
        try:
            model = cls(**{**arch, "pretrained": False})  # the checkpoint holds the weights: no download
            model.load_state_dict(_without_pooling_stage(state["model"]))
        except (TypeError, ValueError, RuntimeError, KeyError) as exc:
            raise CheckpointError(f"{source} does not describe a model this version builds: {exc}") from None
        return model.eval()

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

    def _coalition_head(self, tokens: torch.Tensor, plan: PackPlan) -> torch.Tensor:
        """v_x(S) of every packed row: Φ per kept patch token, summed per row: (T, D) -> (R, K)."""
        return segment_patch_sum(self._head_packed(tokens, plan), plan)

    def forward(
        self, images: torch.Tensor, coalitions: torch.Tensor | None = None, *, paired: bool | None = None
    ) -> ShapleyOutput:
        """Φ(x) and f(x), and v_x(S) when coalitions are given.

        Args:
            images: (B, C, H, W).
            coalitions: optional bool (B, M, N) or (M, N); then one packed pass of the engine
                computes everything (see :meth:`forward_coalitions`).
            paired: coalitions 2i and 2i+1 are complements (None: detected).

        Returns:
            A :class:`ShapleyOutput` (phi (B, N, K), logits (B, K), values (B, M, K) or None).
        """
        if coalitions is not None:
            return self.forward_coalitions(images, coalitions, paired=paired)
        check_images(images, self.backbone)
        tokens = self.backbone.forward_features(images)
        if self.head_block is not None:
            tokens = self.head_block(tokens)
        phi = self.head(self.head_norm(tokens[:, self.num_prefix_tokens :])).float()
        return ShapleyOutput(phi=phi, logits=phi.sum(dim=1))

    @renamed_arguments(chunk_size="chunk_rows")
    def coalition_forward(
        self,
        images: torch.Tensor,
        *,
        chunk_rows: int | None = None,
        precision: Precision = "auto",
        sync_checks: bool = False,
    ) -> CoalitionForward:
        """v_x(S) for any coalitions of ``images`` (B, C, H, W), checked once: a function of
        coalitions bool (B, M, N) or (M, N) (and ``paired=``) -> (B, M, K) float32. ``chunk_rows``,
        ``precision``: as :meth:`coalition_values`; ``sync_checks``: see
        :class:`~shapkern.engine.CoalitionForward`."""
        return CoalitionForward(
            self.backbone,
            images,
            head=self._coalition_head,
            precision=precision,
            chunk_rows=chunk_rows,
            sync_checks=sync_checks,
        )

    @renamed_arguments(chunk_size="chunk_rows")
    def coalition_values(
        self,
        images: torch.Tensor,
        coalitions: torch.Tensor,
        *,
        paired: bool | None = None,
        precision: Precision = "auto",
        chunk_rows: int | None = None,
    ) -> torch.Tensor:
        """v_x(S) = Σ_{n∈S} Φ(x_S)_n for every image and coalition.

        Args:
            images: (B, C, H, W).
            coalitions: bool (B, M, N), or (M, N) shared by all images.
            paired: coalitions 2i and 2i+1 are complements (None: detected; see
                :func:`~shapkern.engine.fused_coalition_forward`).
            precision: the encoder's blocks, ``"auto"`` or ``"fp8"`` (e4m3 GEMMs, forward only; see
                :func:`~shapkern.engine.fused_coalition_forward`); the head stays in the model's dtype.
            chunk_rows: (image, coalition) rows per pass; default as the engine's (from free memory
                on CUDA, at most 256 on the CPU, where larger passes run slower per row).

        Returns:
            (B, M, K) float32; the empty coalition gives 0.
        """
        return self.coalition_forward(images, chunk_rows=chunk_rows, precision=precision)(
            coalitions, paired=paired
        )

    def forward_coalitions(
        self, images: torch.Tensor, coalitions: torch.Tensor | None = None, *, paired: bool | None = None
    ) -> ShapleyOutput:
        """Φ(x), f(x) and v_x(S) from one packed pass of the engine.

        The full and the empty coalition are prepended as one complementary pair, so the full
        view of every image runs in the same pass (and the same layout) as its coalitions.

        Args:
            images: (B, C, H, W).
            coalitions: bool (B, M, N), (M, N), or None (then only Φ and f).
            paired: coalitions 2i and 2i+1 are complements (None: detected).
        """
        packed = CoalitionForward(self.backbone, images).tokens(coalitions, paired=paired, with_ends=True)
        plan, (batch, rows_per_image) = packed.plan, packed.shape
        phi_tokens = self._head_packed(packed.tokens, plan)
        rows = torch.arange(batch, device=images.device) * rows_per_image
        first = plan.cu_seqlens[rows].long() + self.num_prefix_tokens
        phi = phi_tokens[first.unsqueeze(1) + torch.arange(self.num_players, device=images.device)]
        values = segment_patch_sum(phi_tokens, plan).view(batch, rows_per_image, self.num_classes)[:, 2:]
        return ShapleyOutput(
            phi=phi, logits=phi.sum(dim=1), values=values if coalitions is not None else None
        )


POOLING_STAGE = ("backbone.fc_norm.", "backbone.attn_pool.")


def _drop_pooling_stage(backbone: nn.Module) -> None:
    """Remove a timm backbone's classifier and pooling stage. Φ reads every patch token after the
    final norm: the pooling stage is unused, and its parameters would get no gradient (which
    DistributedDataParallel refuses)."""
    pool = "avg" if getattr(backbone, "global_pool", None) == "map" else None
    backbone.reset_classifier(0, pool)  # type: ignore[operator]  # a timm model's method
    if isinstance(getattr(backbone, "fc_norm", None), nn.Module):
        backbone.fc_norm = nn.Identity()


def _without_pooling_stage(weights: dict) -> dict:
    """A checkpoint's weights without the backbone's pooling stage, which checkpoints written before
    0.3 may hold although the model never used it."""
    return {k: v for k, v in weights.items() if not k.startswith(POOLING_STAGE)}
