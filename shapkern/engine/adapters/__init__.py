"""Model families of the packed engine: one :class:`ModelAdapter` per family, one file each.

:func:`adapter_for` finds the adapter of a model; adding a family means writing its adapter and
listing it in ``ADAPTERS`` (docs/design.md, "Model families").
"""

from __future__ import annotations

from torch import nn

from shapkern.engine.adapters.base import BlockPath, ModelAdapter, Output, unsupported
from shapkern.engine.adapters.hf_vit import HFVisionTransformer
from shapkern.engine.adapters.image_text import DualEncoder, dual_encoder
from shapkern.engine.adapters.open_clip_vit import OpenClipTimmModel, OpenClipVisionTransformer
from shapkern.engine.adapters.timm_beit import TimmBeit
from shapkern.engine.adapters.timm_eva import TimmEva
from shapkern.engine.adapters.timm_siglip import TimmViTLatentPool
from shapkern.engine.adapters.timm_vit import TimmViT

__all__ = [
    "ADAPTERS",
    "BlockPath",
    "DualEncoder",
    "ModelAdapter",
    "Output",
    "adapter_for",
    "dual_encoder",
    "supported_families",
    "unsupported",
]

ADAPTERS: tuple[type[ModelAdapter], ...] = (
    TimmViT,
    TimmViTLatentPool,
    TimmEva,
    TimmBeit,
    HFVisionTransformer,
    OpenClipVisionTransformer,
    OpenClipTimmModel,
)


def supported_families() -> str:
    """The families the packed engine runs, for messages: "A or B or C"."""
    return " or ".join(adapter.family for adapter in ADAPTERS)


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The checked adapter of ``model``; NotImplementedError naming the model, the supported
    families and ``mode='input'`` when the packed engine cannot run it."""
    for adapter in ADAPTERS:
        if adapter.claims(model):
            checked = adapter(model)
            checked.check()
            return checked
    raise NotImplementedError(
        f"{type(model).__name__} is not supported by the packed coalition engine (not a "
        f"{supported_families()} model). For other models use mode='input', which masks pixels."
    )
