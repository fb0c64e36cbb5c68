"""The interface between the packed engine and one family of models (docs/design.md, "Model families").

The engine knows nothing of concrete model classes: it asks the adapter of a model to embed the
images once, run the blocks on packed tokens, and pool and classify every (image, coalition) row.
A family is one file under ``engine/adapters/`` holding a :class:`ModelAdapter` subclass, listed
in ``engine/adapters/__init__.py``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import nn

from shapkern.packed import AttentionFn, PackPlan

__all__ = ["BlockPath", "ModelAdapter", "Output", "Submodule", "TimmAdapter", "unsupported"]

# A model or one of its submodules, read by attribute: nn.Module's __getattr__ is typed as returning
# Tensor | Module, so the adapters' attribute reads (model.blocks, attn.qkv, ...) are typed Any.
Submodule = Any

# "plain": the model's modules; "compiled": under torch.compile; "fused": shapkern's fused kernels;
# "fp8": e4m3 GEMMs (forward only).
BlockPath = Literal["plain", "compiled", "fused", "fp8"]
Output = Literal["logits", "pre_logits"]


def unsupported(model: nn.Module, family: str, why: str, supported: str) -> NotImplementedError:
    """The error for a model of ``family`` in a variant the packed engine does not run."""
    return NotImplementedError(
        f"{type(model).__name__} is not supported by the packed coalition engine ({why}). "
        f"Supported {family}: {supported}. For other models use mode='input', which masks pixels."
    )


class ModelAdapter:
    """One model of a family, as the packed engine runs it.

    Subclasses set ``family`` (a name for messages and README's table) and implement the methods
    below. A row r = b * M + m is image b under coalition m; a row's sequence is its P prefix tokens
    (always kept) then its kept patch tokens in patch order (:mod:`shapkern.packed`).
    """

    family: ClassVar[str]
    block_paths: ClassVar[tuple[str, ...]] = ("plain", "compiled")

    def __init__(self, model: nn.Module):
        self.model: Submodule = model

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this family (then :meth:`check` names what is unsupported)."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise NotImplementedError (see :func:`unsupported`) for a variant the engine cannot run."""

    @property
    def num_players(self) -> int:
        """N, the patches of the input grid."""
        raise NotImplementedError

    @property
    def num_prefix_tokens(self) -> int:
        """P, the tokens every row keeps ahead of its patches (class, register, distillation)."""
        raise NotImplementedError

    @property
    def width(self) -> int:
        """D, the token width."""
        raise NotImplementedError

    @property
    def depth(self) -> int:
        """The number of blocks (activation memory grows with it under autograd)."""
        raise NotImplementedError

    def check_block_path(self, path: BlockPath, images: torch.Tensor) -> None:
        """Raise unless ``path`` can run this model on ``images`` now."""
        if path not in self.block_paths:
            raise NotImplementedError(
                f"the {path!r} block path does not run {self.family} models; they run {self.block_paths}"
            )

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch and positional embedding once per image: (B, C, H, W) -> (B, P + N, D)."""
        raise NotImplementedError

    def blocks(
        self, x: torch.Tensor, plan: PackPlan, attention: AttentionFn, path: BlockPath
    ) -> torch.Tensor:
        """Everything between the embedding and the final norm on packed tokens: (T, D) -> (T, D)."""
        raise NotImplementedError

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The model's norm after the blocks, per token: (T, D) -> (T, D)."""
        raise NotImplementedError

    def pool_head(self, x: torch.Tensor, plan: PackPlan, output: Output) -> torch.Tensor:
        """Pooling per row over its kept tokens, then the head, on the blocks' output (before the
        final norm): (T, D) -> (R, K) logits or (R, D) pre-logits."""
        raise NotImplementedError


class TimmAdapter(ModelAdapter):
    """What timm's ViT-like families share: a ``patch_embed`` with ``num_patches``,
    ``num_prefix_tokens``, ``embed_dim`` and a ``blocks`` list."""

    @property
    def num_players(self) -> int:
        return self.model.patch_embed.num_patches

    @property
    def num_prefix_tokens(self) -> int:
        return self.model.num_prefix_tokens

    @property
    def width(self) -> int:
        return self.model.embed_dim

    @property
    def depth(self) -> int:
        return len(self.model.blocks)
