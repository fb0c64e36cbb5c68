"""Backbones for self-explaining ViTs: timm Vision Transformers by name, with local weights."""

from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["create_backbone", "load_backbone_weights"]


def _read_state_dict(path: str | os.PathLike) -> dict:
    """A state dict from a local file: safetensors, or a torch checkpoint read with the safe loader."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, or objects the safe loader refuses
        raise ValueError(f"cannot read weights from {path} with the safe loader: {exc}") from None


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike) -> None:
    """Load a local timm checkpoint (state dict, timm/shapkern checkpoint or safetensors) into
    ``backbone``, resampling position and patch embeddings to its size, ignoring classifier heads."""
    state = _read_state_dict(path)
    for key in ("model", "state_dict", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if any(k.startswith("backbone.") for k in state):  # a shapkern ShapleyViT checkpoint
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
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
        load_backbone_weights(backbone, checkpoint)
    return backbone
