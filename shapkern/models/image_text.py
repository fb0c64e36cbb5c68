"""The self-explaining image-text model (docs/design.md, "Image-text matching"): a ShapleyViT whose
Shapley head outputs each patch's contribution in the joint embedding space, and a small text encoder.

Φ(x) ∈ R^{N×D}; the image embedding is f(x) = Σ_n Φ(x)_n, a text's embedding e_t is unit-norm, and the
similarity is CLIP's, s(x, t) = exp(τ) ⟨f(x), e_t⟩ / ‖f(x)‖ (+ b with the sigmoid loss).

The game it explains is v_{x,t}(S) = exp(τ) ⟨f(x_S), e_t⟩ / ‖f(x)‖ (+ b): the masked image's embedding
scored with the full image's normalisation, a constant per image (as a classifier's game is its
logits, before the softmax normalises them). It equals s(x, t) at the full coalition, b at the empty
one, and is linear in f(x_S), so its Shapley values are exp(τ) ⟨Φ(x)_n, e_t⟩ / ‖f(x)‖ for every text
at once (when ℓ_sv has made Φ the Shapley values of f's own game): the K axis of an explanation is
the texts. The cosine game exp(τ) cos(f(x_S), e_t) normalises every coalition by its own norm, which
is not additive over patches; benchmarks/experiments/image_text measures how far Φ is from its values.
Normalising matters for retrieval: an unnormalised, patch-additive f(x) grows with the number of
objects in an image, which costs text→image recall.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple, get_args

import torch
from torch import nn

from shapkern.checkpoint import CheckpointError, load_checkpoint
from shapkern.engine import Precision
from shapkern.models.shapley_vit import Head, ShapleyViT
from shapkern.models.text import TextEncoder, WordTokenizer

__all__ = ["CONTRASTIVES", "Contrastive", "ImageTextOutput", "ShapleyCLIP", "self_explaining_from_state"]

# CLIP's softmax over the batch, or SigLIP's sigmoid per pair (which adds a learned bias).
Contrastive = Literal["softmax", "sigmoid"]
CONTRASTIVES: tuple[Contrastive, ...] = get_args(Contrastive)
MAX_LOG_SCALE = math.log(100.0)  # CLIP's clamp of the learned temperature


class ImageTextOutput(NamedTuple):
    """What a :class:`ShapleyCLIP` returns, float32.

    Attributes:
        phi: (B, N, D) Φ(x). image: (B, D) f(x) = Σ_n Φ(x)_n.
        values: (B, M, D) f(x_S) of the M coalitions, or None.
        text: (K, D) unit text embeddings, or None when no texts were given.
        scale: () exp(τ). bias: () b, or None (softmax).

    ``norm`` (B, 1) is ‖f(x)‖, the per-image constant of the similarity and of the game.
    """

    phi: torch.Tensor
    image: torch.Tensor
    values: torch.Tensor | None
    text: torch.Tensor | None
    scale: torch.Tensor
    bias: torch.Tensor | None

    @property
    def norm(self) -> torch.Tensor:
        return self.image.norm(dim=-1, keepdim=True)

    def similarity(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """exp(τ) ⟨f, e_t⟩ / ‖f(x)‖ (+ b) with the texts: of f(x) (B, D) (CLIP's cosine similarity,
        the default) or of the coalitions' embeddings f(x_S) (B, M, D) (the game's values): (B, [M,] K)."""
        if self.text is None:
            raise ValueError("similarities need the texts: call the model with texts")
        image, norm = (self.image, self.norm) if values is None else (values, self.norm.unsqueeze(1))
        sims = self.scale * (image / norm) @ self.text.T
        return sims if self.bias is None else sims + self.bias


class ShapleyCLIP(nn.Module):
    """A self-explaining image-text model: Φ(x) (B, N, D) in the joint space, f(x) = Σ_n Φ(x)_n,
    texts through a :class:`~shapkern.models.TextEncoder`, similarity exp(τ) ⟨f(x), e_t⟩/‖f(x)‖ (+ b).

    Args:
        backbone: a timm ViT name (its classifier removed), built with ``backbone_kwargs``.
        joint_dim: D, the joint space.
        vocab: the tokeniser's words (``<pad>``, ``<unk>`` first). context_length: L.
        head: the Shapley head (see :class:`ShapleyViT`).
        text_width, text_depth, text_heads: the text encoder's size.
        contrastive: ``"softmax"`` (CLIP) or ``"sigmoid"`` (SigLIP: with a learned bias b).
        init_scale: exp(τ) at initialisation.
        checkpoint, pretrained: the backbone's weights (see :class:`ShapleyViT`); a checkpoint of this
            model records its own weights, so :meth:`from_state` reads neither.
    """

    def __init__(
        self,
        backbone: str,
        joint_dim: int,
        vocab: Sequence[str],
        context_length: int,
        *,
        head: Head = "linear",
        text_width: int = 64,
        text_depth: int = 1,
        text_heads: int = 2,
        contrastive: Contrastive = "softmax",
        init_scale: float = 10.0,
        checkpoint: str | os.PathLike | None = None,
        pretrained: bool = False,
        **backbone_kwargs,
    ):
        super().__init__()
        if contrastive not in CONTRASTIVES:
            raise ValueError(f"contrastive must be one of {CONTRASTIVES}, got {contrastive!r}")
        text = {"text_width": text_width, "text_depth": text_depth, "text_heads": text_heads}
        self.arch = {
            "backbone": backbone,
            "joint_dim": joint_dim,
            "vocab": list(vocab),
            "context_length": context_length,
            "head": head,
            **text,
            "contrastive": contrastive,
            "init_scale": init_scale,
            **backbone_kwargs,
        }
        self.image = ShapleyViT(
            backbone, joint_dim, head, checkpoint=checkpoint, pretrained=pretrained, **backbone_kwargs
        )
        # f(x) sums N per-patch outputs that start nearly equal: a head N times smaller than timm's
        # usual 0.02 starts f(x) near unit norm, where CLIP's normalised embeddings are.
        nn.init.normal_(self.image.head.weight, std=0.02 / self.image.num_players)
        nn.init.zeros_(self.image.head.bias)
        self.tokenizer = WordTokenizer(vocab, context_length)
        self.text = TextEncoder(
            len(vocab), joint_dim, context_length, width=text_width, depth=text_depth, heads=text_heads
        )
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.bias = nn.Parameter(torch.tensor(-init_scale)) if contrastive == "sigmoid" else None
        self.joint_dim, self.contrastive = joint_dim, contrastive

    @classmethod
    def from_state(cls, state: dict, source: str = "the checkpoint") -> ShapleyCLIP:
        """The model of a loaded ``shapkern train --task image-text`` checkpoint, in eval mode."""
        arch = state.get("arch")
        if not isinstance(arch, dict) or "vocab" not in arch or not isinstance(state.get("model"), dict):
            raise CheckpointError(f"{source} is not an image-text checkpoint written by `shapkern train`")
        try:
            model = cls(**arch)
            model.load_state_dict(state["model"])
        except (TypeError, ValueError, RuntimeError, KeyError) as exc:
            raise CheckpointError(f"{source} does not describe a model this version builds: {exc}") from None
        return model.eval()

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, map_location="cpu") -> ShapleyCLIP:
        """The model saved in a ``shapkern train --task image-text`` checkpoint, in eval mode."""
        state = load_checkpoint(str(path), map_location=map_location)
        return cls.from_state(state, str(path)).to(map_location)

    @property
    def num_players(self) -> int:
        """N, the number of patches."""
        return self.image.num_players

    @property
    def scale(self) -> torch.Tensor:
        """exp(τ), the learned temperature (clamped at 100, as CLIP's)."""
        return self.log_scale.clamp(max=MAX_LOG_SCALE).exp()

    def encode_text(self, texts: str | Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Unit text embeddings (K, D) of strings, or of tokens (K, L) int64."""
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenizer(texts)
        return self.text(tokens.to(self.log_scale.device))

    def forward(
        self,
        images: torch.Tensor,
        texts: str | Sequence[str] | torch.Tensor | None = None,
        coalitions: torch.Tensor | None = None,
        *,
        paired: bool | None = None,
    ) -> ImageTextOutput:
        """Φ(x), f(x) and (with coalitions) f(x_S) in one packed pass, and the texts' embeddings.

        Args:
            images: (B, C, H, W). texts: strings or tokens (K, L) int64, or None.
            coalitions: bool (B, M, N) or (M, N), or None. paired: see :class:`ShapleyViT`.
        """
        phi, image, values = self.image(images, coalitions, paired=paired)
        text = None if texts is None else self.encode_text(texts)
        return ImageTextOutput(phi, image, values, text, self.scale, self.bias)

    def coalition_forward(
        self,
        images: torch.Tensor,
        *,
        chunk_rows: int | None = None,
        precision: Precision = "auto",
        sync_checks: bool = False,
    ) -> Callable[..., torch.Tensor]:
        """Its own game's embeddings f(x_S) for any coalitions of ``images``: (B, M, N) -> (B, M, D)."""
        return self.image.coalition_forward(
            images, chunk_rows=chunk_rows, precision=precision, sync_checks=sync_checks
        )


def self_explaining_from_state(state: dict, source: str = "the checkpoint") -> ShapleyViT | ShapleyCLIP:
    """The model of a loaded ``shapkern train`` checkpoint of either task (an image-text checkpoint's
    architecture records its vocabulary), in eval mode."""
    arch = state.get("arch")
    if isinstance(arch, dict) and "vocab" in arch:
        return ShapleyCLIP.from_state(state, source)
    return ShapleyViT.from_state(state, source)
