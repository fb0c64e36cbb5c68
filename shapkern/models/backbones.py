"""Backbones for self-explaining ViTs: timm Vision Transformers by name (``arch`` or ``arch.tag``),
with random weights, timm's pretrained weights (``pretrained=True``: the Hugging Face hub or its
local cache, honouring ``HF_HUB_OFFLINE``), or weights from a local file.

Either way the patch grid and the position embedding follow the requested ``img_size`` and
``patch_size``: timm's ``checkpoint_filter_fn`` resamples the position embedding (bicubic) and the
patch embedding (pseudo-inverse resize) of the source weights to the backbone's shapes.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from shapkern.checkpoint import load_checkpoint

__all__ = [
    "check_model_name",
    "create_backbone",
    "hub_error",
    "load_backbone_weights",
    "native_input",
    "pretrained_normalization",
    "read_state_dict",
]


def read_state_dict(path: str | os.PathLike) -> dict:
    """A state dict from a local file: safetensors, or a torch checkpoint read with the safe loader
    (checksums verified; CheckpointError, a ValueError, for a damaged or unsafe file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if not str(path).endswith(".safetensors"):
        return load_checkpoint(str(path))
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, ValueError, OSError) as exc:  # empty, truncated or corrupt header or data
        raise ValueError(
            f"cannot read weights from {path}: not a valid safetensors file (empty, truncated or corrupt: "
            f"{exc})"
        ) from None


def _check_finite(state: dict, path: str | os.PathLike) -> None:
    bad = [
        k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()
    ]
    if bad:
        raise ValueError(
            f"weights {path} hold NaN or inf values, in {len(bad)} tensor(s): {bad[:5]}"
            f"{'...' if len(bad) > 5 else ''}; training from them would diverge at once"
        )


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike) -> None:
    """Load a local timm checkpoint (state dict, timm/shapkern checkpoint or safetensors) into
    ``backbone``, resampling position and patch embeddings to its size, ignoring classifier heads."""
    state = read_state_dict(path)
    for key in ("model", "state_dict", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if any(k.startswith("backbone.") for k in state):  # a shapkern ShapleyViT checkpoint
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    _check_finite(state, path)
    from timm.models.vision_transformer import checkpoint_filter_fn

    try:
        # Resamples position and patch embeddings; typed for VisionTransformer, it reads only what
        # every timm ViT family has.
        state = checkpoint_filter_fn(state, backbone)  # type: ignore[arg-type]
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


def check_model_name(name: str) -> None:
    """ValueError for an architecture timm does not know, or a pretrained tag it has not for it."""
    import timm

    if not isinstance(name, str) or not timm.is_model(name):
        arch = name.split(".")[0] if isinstance(name, str) else ""
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8] if arch else []
        raise ValueError(f"unknown model {name!r} (timm has no such architecture); similar: {close}")
    try:
        timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # "Invalid pretrained tag"
        arch, tag = name.split(".", 1)
        raise ValueError(
            f"unknown pretrained tag {tag!r} for {arch!r}; timm has {timm.list_pretrained(arch + '.*')}"
        ) from None


def hub_error(name: str, exc: Exception) -> ValueError:
    """The error for pretrained weights that timm could not fetch: names the model, the cache looked
    in and what to do; HF_HUB_OFFLINE decides whether the network was tried at all."""
    from huggingface_hub import constants

    cache = f"the Hugging Face cache {constants.HF_HUB_CACHE} (set by HF_HOME or HF_HUB_CACHE)"
    if constants.HF_HUB_OFFLINE:
        fix = (
            f"HF_HUB_OFFLINE=1 is set and they are not in {cache}; run once with internet access and "
            "without HF_HUB_OFFLINE to download them, copy such a cache here, or pass a local file "
            "with --weights"
        )
    else:
        fix = (
            f"they are not in {cache} and the hub could not be reached; check the connection, set "
            "HF_HUB_OFFLINE=1 with a cache that holds them, or pass a local file with --weights"
        )
    return ValueError(f"cannot load the pretrained weights of {name!r}: {fix} ({type(exc).__name__}: {exc})")


def create_backbone(
    name: str, *, checkpoint: str | os.PathLike | None = None, pretrained: bool = False, **kwargs
) -> nn.Module:
    """``timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)``, or weights from a
    local ``checkpoint`` file.

    Args:
        name: a timm architecture, optionally with a pretrained tag (``"vit_small_patch16_224"``,
            ``"vit_small_patch16_224.augreg_in21k_ft_in1k"``); the tag selects which weights
            ``pretrained`` loads and changes nothing without it.
        checkpoint: a local weights file (exclusive with ``pretrained``).
        pretrained: load timm's pretrained weights through timm (the hub, or the local Hugging Face
            cache; ``HF_HUB_OFFLINE=1`` uses only the cache). Their classifier is dropped.
        kwargs: timm model arguments (img_size, patch_size, depth, ...). The size overrides must keep
            the pretrained architecture; img_size and patch_size may change it (resampled).

    Raises ValueError for an unknown model or tag, weights that cannot be fetched or do not fit.
    """
    import timm

    check_model_name(name)
    if pretrained and checkpoint is not None:
        raise ValueError(f"give pretrained=True or a weights file, not both (got {checkpoint})")
    try:
        backbone = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except OSError as exc:  # only pretrained loading touches files or the network
        raise hub_error(name, exc) from exc
    except RuntimeError as exc:
        if not pretrained:
            raise
        detail = " ".join(line.strip() for line in str(exc).splitlines()[:3])  # timm lists every tensor
        raise ValueError(
            f"cannot load the pretrained weights of {name!r} into the backbone built with {kwargs} (the "
            f"size overrides depth, embed_dim and num_heads must keep the pretrained architecture): {detail}"
        ) from exc
    if checkpoint is not None:
        load_backbone_weights(backbone, checkpoint)
    return backbone


def native_input(name: str) -> tuple[int, int]:
    """The image size and patch size timm builds ``name`` with (e.g. 224 and 16).

    Read from the model built with one block and random weights (timm 1.0.20 cannot build models
    on the meta device); raises ValueError for a model that is not a ViT with a fixed input size.
    """
    import timm

    check_model_name(name)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, depth=1)
    except TypeError as exc:  # no `depth`: not a ViT
        raise ValueError(f"model {name!r} is not a ViT with a patch embedding: {exc}") from None
    embed = getattr(model, "patch_embed", None)
    if embed is None or getattr(embed, "img_size", None) is None:
        raise ValueError(
            f"model {name!r} has no fixed image size and patch size: give --img-size and --patch-size"
        )
    return int(embed.img_size[0]), int(embed.patch_size[0])


def pretrained_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel (mean, std) that ``name``'s pretrained weights expect (timm's pretrained
    config: 0.5 for AugReg ViTs, ImageNet's for DeiT), ImageNet's when timm records none."""
    import timm
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    check_model_name(name)
    cfg = timm.models.get_pretrained_cfg(name)
    mean = getattr(cfg, "mean", None) or IMAGENET_DEFAULT_MEAN
    std = getattr(cfg, "std", None) or IMAGENET_DEFAULT_STD
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
