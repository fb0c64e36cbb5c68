"""Models to explain, by name, with the preprocessing their weights expect.

``load_model`` takes:

- a timm name (``"vit_base_patch16_224"``, ``"vit_small_patch16_224.augreg_in21k_ft_in1k"``), with
  random weights, timm's pretrained ones (``pretrained=True``) or a local ``weights`` file (a state
  dict, timm checkpoint or safetensors file; its classifier's size sets the number of classes); the
  preprocessing is timm's data config for the model (mean, std, interpolation, crop);
- ``"hf:ID_OR_FOLDER"``: a Hugging Face transformers model (the class its config names) with its
  image processor's preprocessing (:mod:`~shapkern.explainers.hub_models`);
- ``"open_clip:ARCH"``, ``"open_clip:ARCH:TAG"`` or ``"open_clip:hf-hub:ORG/NAME"``: an open_clip
  model's image tower with its preprocessing config;
- ``checkpoint=PATH``: a ``shapkern train`` checkpoint (a ShapleyViT, or an image-text ShapleyCLIP) with
  the preprocessing it records.

Image-text models (a ShapleyCLIP checkpoint, open_clip names, Hugging Face ``CLIPModel`` and
``SiglipModel``) also come with ``image_text``: the model whose similarity with texts
``explain(named.image_text, images, texts=...)`` explains.

Nothing is downloaded unless ``pretrained=True``; then the Hugging Face hub or its local cache is
used, and ``HF_HUB_OFFLINE=1`` allows the cache only. A name without trained weights gets random
ones drawn from seed :data:`RANDOM_WEIGHTS_SEED` (the global RNG is left as it was), so every process
of a run, and a resumed run, explains the same model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from shapkern.checkpoint import load_checkpoint
from shapkern.data import Preprocessing
from shapkern.data.preprocess import INTERPOLATIONS
from shapkern.engine import find_patch_embed
from shapkern.explainers.hub_models import HF_PREFIX, OPEN_CLIP_PREFIX, load_hf, load_open_clip
from shapkern.models import (
    ShapleyCLIP,
    check_model_name,
    hub_error,
    read_state_dict,
    self_explaining_from_state,
)

__all__ = [
    "RANDOM_WEIGHTS_SEED",
    "NamedModel",
    "as_named_model",
    "load_model",
    "timm_preprocessing",
    "weights_digest",
]

RANDOM_WEIGHTS_SEED = 0  # a name without trained weights gets the same random ones in every process and run


@dataclass
class NamedModel:
    """A model with what explaining a dataset needs to know about it.

    Attributes:
        model: the module, in eval mode.
        name: how it was named (a timm name, ``hf:...``, ``open_clip:...``, ``checkpoint:PATH``)
            or its class name.
        preprocessing: how image files become its inputs, or None (then a dataset's own default).
        input_size: its (H, W).
        classes: class names, or None.
        data: a checkpoint's record of its training data (name, classes, preprocessing), or None.
        random_weights: a name loaded without trained weights (seeded, see the module).
        image_text: the image-text model (whose image tower is ``model``, or ``model`` itself) for
            ``explain(..., texts=...)``, or None: a model without a text tower.
        tokenizer: strings -> token ids (K, L) for ``image_text``, where shapkern does not build one
            itself (a Hugging Face folder's tokenizer), or None.
    """

    model: nn.Module
    name: str
    preprocessing: Preprocessing | None
    input_size: tuple[int, int]
    classes: list[str] | None = None
    data: dict | None = None
    random_weights: bool = False
    image_text: nn.Module | None = None
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None

    def record(self) -> dict:
        """What a store's manifest says about the model: name, class, input size, preprocessing
        and a SHA-256 of its weights (a changed model is a changed setting)."""
        return {
            "name": self.name,
            "class": f"{type(self.model).__module__}.{type(self.model).__name__}",
            "input_size": list(self.input_size),
            "preprocessing": None if self.preprocessing is None else self.preprocessing.to_dict(),
            "weights_sha256": weights_digest(self.model),
        }


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state dict: names, dtypes, shapes and bytes, in order."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        if not torch.is_tensor(value):
            continue
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def timm_preprocessing(model: nn.Module, name: str) -> tuple[Preprocessing, tuple[int, int]]:
    """The test view timm's data config gives ``model`` (as timm's eval transform makes it) and
    its input size (H, W): its patch embedding's, which a size override changes and the config not."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config(model=model)
    if cfg.get("crop_mode", "center") != "center":
        raise ValueError(
            f"{name}: timm's data config crops with crop_mode {cfg['crop_mode']!r}; shapkern's test view "
            "makes 'center' crops only"
        )
    if cfg["interpolation"] not in INTERPOLATIONS:
        raise ValueError(
            f"{name}: timm's data config resizes with {cfg['interpolation']!r}; shapkern's test view "
            f"takes one of {INTERPOLATIONS}"
        )
    channels, height, width = cfg["input_size"]
    height, width = _input_size(model) or (height, width)  # the model's own size (built with img_size=...)
    prep = Preprocessing(
        color="L" if channels == 1 else "RGB",
        mean=tuple(float(m) for m in cfg["mean"]),
        std=tuple(float(s) for s in cfg["std"]),
        channels=channels,
        crop_pct=float(cfg["crop_pct"]),
        interpolation=cfg["interpolation"],
    )
    return prep, (int(height), int(width))


def _timm_weights(model: Any, path: str) -> None:
    """Load a local weights file, classifier included, into a timm model (resized to the file's
    number of classes; timm's own filter converts original formats)."""
    import sys

    state = read_state_dict(path)
    for key in ("model", "state_dict", "model_state"):
        if isinstance(state.get(key), dict):
            state = state[key]
    if any(k.startswith("backbone.") for k in state):
        raise ValueError(f"{path} is a `shapkern train` checkpoint: explain it with --checkpoint {path}")
    head = model.pretrained_cfg.get("classifier", "head")
    head = head[0] if isinstance(head, list | tuple) else head
    classes = state.get(f"{head}.weight")
    if classes is not None and classes.shape[0] != model.num_classes:
        model.reset_classifier(classes.shape[0])
    convert = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    try:
        state = convert(state, model) if convert is not None else state
        model.load_state_dict(state)
    except (KeyError, RuntimeError, ValueError) as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[:3])
        raise ValueError(
            f"weights {path} do not fit {model.pretrained_cfg['architecture']}: {detail}"
        ) from None


def _load_timm(name: str, *, pretrained: bool, weights: str | None) -> NamedModel:
    import timm

    check_model_name(name)
    try:
        model = timm.create_model(name, pretrained=pretrained)
    except OSError as exc:  # only pretrained loading touches files or the network
        raise hub_error(name, exc) from exc
    if weights is not None:
        _timm_weights(model, weights)
    prep, size = timm_preprocessing(model, name)
    return NamedModel(model, name, prep, size)


def _load_checkpoint(path: str) -> NamedModel:
    state = load_checkpoint(path)
    model = self_explaining_from_state(state, path)
    data = state.get("data")
    if not isinstance(data, dict) or "preprocessing" not in data:
        raise ValueError(
            f"{path} records no data preprocessing; it was not written by this version of `shapkern train`"
        )
    prep = Preprocessing.from_dict(data["preprocessing"], source=path)  # a record this version can follow
    height, width = (int(s) for s in cast(Any, find_patch_embed(model)).img_size)
    named = NamedModel(model, f"checkpoint:{path}", prep, (height, width), data.get("classes"), data)
    named.image_text = model if isinstance(model, ShapleyCLIP) else None
    return named


def _load_named(name: str, *, pretrained: bool, weights) -> NamedModel:
    if name.startswith(HF_PREFIX):  # a folder or the hub: trained weights
        return NamedModel(**load_hf(name[len(HF_PREFIX) :], pretrained=pretrained, weights=weights))
    random = not pretrained and weights is None
    if name.startswith(OPEN_CLIP_PREFIX):
        spec = name[len(OPEN_CLIP_PREFIX) :]
        named = NamedModel(**load_open_clip(spec, pretrained=pretrained, weights=weights))
    else:
        named = _load_timm(
            name, pretrained=pretrained, weights=None if weights is None else os.fspath(weights)
        )
    named.random_weights = random
    return named


def load_model(
    name: str | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
) -> NamedModel:
    """A model by ``name`` (see the module) or from a ``shapkern train`` ``checkpoint``, on ``device``
    in eval mode, with its preprocessing.

    Args:
        name: a timm name, ``"hf:ID_OR_FOLDER"`` or ``"open_clip:..."``.
        checkpoint: a ``shapkern train`` checkpoint instead of ``name``.
        pretrained: load the named pretrained weights (the hub or its local cache).
        weights: a local weights file (timm and open_clip names).

    Raises ValueError for an unknown name, weights that cannot be found or do not fit, a missing
    optional package (transformers, open_clip), or a checkpoint that is not shapkern's.
    """
    if (name is None) == (checkpoint is None):
        raise ValueError("give a model name or a checkpoint (--model or --checkpoint), exactly one")
    if weights is not None and not os.path.isfile(weights):
        raise FileNotFoundError(f"weights file not found: {weights}")
    if checkpoint is not None:
        if pretrained or weights is not None:
            raise ValueError("--pretrained and --weights go with --model; a checkpoint holds its own weights")
        named = _load_checkpoint(os.fspath(checkpoint))
    elif pretrained and weights is not None:
        raise ValueError(f"give --pretrained or --weights, not both (got --weights {weights})")
    else:
        with torch.random.fork_rng(devices=[]):  # random weights are seeded: the same in every process
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            named = _load_named(cast(str, name), pretrained=pretrained, weights=weights)
    if named.image_text is not None:  # the image tower moves with it
        named.image_text = named.image_text.to(device).eval()
    named.model = named.model.to(device).eval()
    return named


def _input_size(model: nn.Module) -> tuple[int, int] | None:
    """A model's (H, W): its timm patch embedding's, its (vision) config's, or its image_size."""
    embed = find_patch_embed(model)
    size = getattr(embed, "img_size", None)
    if size is None:
        config = getattr(model, "config", None)
        size = getattr(getattr(config, "vision_config", config), "image_size", None)
    size = getattr(model, "image_size", None) if size is None else size
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def as_named_model(model: nn.Module | NamedModel, preprocessing: Preprocessing | None = None) -> NamedModel:
    """``model`` with its preprocessing: ``preprocessing`` when given, else timm's data config for a
    timm model, else None (a dataset's own default). Raises ValueError when its input size is unknown."""
    if isinstance(model, NamedModel):
        return model if preprocessing is None else dataclasses.replace(model, preprocessing=preprocessing)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or a NamedModel, got {type(model).__name__}")
    timm_model = type(model).__module__.startswith("timm.")  # built by timm: it has a pretrained_cfg
    name = str(cast(dict, model.pretrained_cfg)["architecture"]) if timm_model else type(model).__name__
    size = _input_size(model)
    if preprocessing is None and timm_model and size is not None:
        preprocessing, size = timm_preprocessing(model, name)
    if size is None:
        raise ValueError(
            f"cannot tell the input size of {type(model).__name__}: load it with "
            "shapkern.explainers.load_model, or pass a NamedModel"
        )
    return NamedModel(model, name, preprocessing, size)
