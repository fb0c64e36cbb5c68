"""Hugging Face transformers and open_clip models by id, with their preprocessing (optional extras).

- ``hf:ID_OR_FOLDER``: the class the model's config names (``architectures``, e.g.
  ``ViTForImageClassification``), from a local folder or the Hugging Face cache; the hub only with
  ``pretrained=True`` (``HF_HUB_OFFLINE=1``: the cache only). Its image processor
  (``preprocessor_config.json``) gives the normalisation, the resize filter and the size or crop.
- ``open_clip:ARCH`` (random weights, or a local ``weights`` file), ``open_clip:ARCH:TAG`` and
  ``open_clip:hf-hub:ORG/NAME`` (pretrained weights, with ``pretrained=True``): the image tower
  (``model.visual``), whose output is the image embedding; open_clip's preprocessing config.

Both give the fields of a :class:`~shapkern.explainers.NamedModel`; a dual encoder (open_clip's CLIP,
Hugging Face ``CLIPModel``/``SiglipModel``) also gives ``image_text``, the whole model, whose similarity
with texts ``shapkern explain --texts`` explains, and a Hugging Face folder's tokenizer when it has one.

Both test views are shapkern's (:func:`~shapkern.data.preprocess_image`: a torchvision resize of the
decoded image), which follows the processor's settings but not its resize code bit for bit.
"""

from __future__ import annotations

import functools
import importlib
import math

import torch

from shapkern.data import Preprocessing
from shapkern.engine import dual_encoder

__all__ = ["HF_PREFIX", "OPEN_CLIP_PREFIX", "load_hf", "load_open_clip"]

HF_PREFIX = "hf:"
OPEN_CLIP_PREFIX = "open_clip:"
_PIL_FILTERS = {2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "spiece.model")


def _optional(package: str, prefix: str):
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ValueError(
            f"{prefix}... models need the optional package {package}: pip install {package.replace('_', '-')}"
        ) from None


def _offline(pretrained: bool) -> bool:
    """Whether to read local files only: without ``pretrained``, or with HF_HUB_OFFLINE set."""
    from huggingface_hub import constants

    return not pretrained or bool(constants.HF_HUB_OFFLINE)


def _field(settings, key: str):
    """A size setting of an image processor: its SizeDict attribute or dict entry, or None."""
    if settings is None:
        return None
    return settings.get(key) if isinstance(settings, dict) else getattr(settings, key, None)


def _crop_pct(crop: int, edge: int) -> float:
    """The crop_pct whose test view resizes the shorter side to ``edge`` and crops ``crop``."""
    pct = crop / edge
    while math.floor(crop / pct) < edge:  # floor(crop / (crop / edge)) can round below edge
        pct = math.nextafter(pct, 0.0)
    return pct


def _hf_preprocessing(processor, ident: str) -> tuple[Preprocessing, tuple[int, int]]:
    """The test view an image processor describes, and the model's input size (H, W)."""
    resample = getattr(processor, "resample", 2)
    filter_name = getattr(resample, "value", resample)
    filter_name = _PIL_FILTERS.get(filter_name, filter_name)
    if filter_name not in ("bilinear", "bicubic"):
        raise ValueError(
            f"hf:{ident}: its image processor resizes with {resample!r}; shapkern takes bilinear or bicubic"
        )
    normalize = getattr(processor, "do_normalize", True)
    mean = tuple(float(m) for m in processor.image_mean) if normalize else (0.0, 0.0, 0.0)
    std = tuple(float(s) for s in processor.image_std) if normalize else (1.0, 1.0, 1.0)
    size, crop = processor.size, getattr(processor, "crop_size", None)
    height, width, edge = _field(size, "height"), _field(size, "width"), _field(size, "shortest_edge")
    if getattr(processor, "do_center_crop", False) and edge and crop is not None:
        crop_h, crop_w = _field(crop, "height"), _field(crop, "width")
        return Preprocessing(
            "RGB", mean, std, crop_pct=_crop_pct(min(crop_h, crop_w), edge), interpolation=filter_name
        ), (crop_h, crop_w)
    if height and width and not getattr(processor, "do_center_crop", False):
        return Preprocessing("RGB", mean, std, interpolation=filter_name), (height, width)
    raise ValueError(
        f"hf:{ident}: its image processor's sizes (size {size}, crop_size {crop}) are neither a fixed "
        "resize nor a shortest-edge resize and centre crop, the views shapkern makes"
    )


def _has_tokenizer_files(transformers, ident: str, local: bool) -> bool:
    """Whether the folder, cache or hub holds a tokenizer: transformers builds a CLIP tokenizer with an
    empty vocabulary from the config alone, which would read every text as the same tokens."""
    for name in TOKENIZER_FILES:
        try:
            transformers.utils.cached_file(ident, name, local_files_only=local)
            return True
        except OSError:
            continue
    return False


def _hf_tokenizer(transformers, ident: str, local: bool):
    """Strings -> token ids (K, L) padded to the tokenizer's length (as CLIP and SigLIP were trained),
    or None when the folder or cache holds no tokenizer. The tokenizer loads at its first use, so a
    model explained without texts never needs what it needs (SigLIP's: sentencepiece)."""
    if not _has_tokenizer_files(transformers, ident, local):
        return None

    @functools.cache
    def loaded():
        try:
            return transformers.AutoTokenizer.from_pretrained(ident, local_files_only=local)
        except ImportError as exc:
            raise ValueError(
                f"hf:{ident}: its tokenizer needs the package {exc.name or exc}: pip install {exc.name or ''}"
            ) from None
        except (OSError, ValueError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(f"hf:{ident}: cannot load its tokenizer ({first})") from None

    def tokenize(texts) -> torch.Tensor:
        return loaded()(list(texts), padding="max_length", truncation=True, return_tensors="pt")["input_ids"]

    return tokenize


def load_hf(ident: str, *, pretrained: bool, weights) -> dict:
    """The NamedModel fields of ``hf:ident``: model in eval mode, name, preprocessing, input size,
    class names or None; for a dual encoder, image_text (the model) and its tokenizer or None."""
    transformers = _optional("transformers", HF_PREFIX)
    if weights is not None:
        raise ValueError(
            f"--weights is for timm and open_clip models; hf:{ident} loads the weights of its folder"
        )
    local = _offline(pretrained)
    try:
        config = transformers.AutoConfig.from_pretrained(ident, local_files_only=local)
        arch = (getattr(config, "architectures", None) or ["AutoModel"])[0]
        cls = getattr(transformers, arch, None)
        if cls is None:
            raise ValueError(
                f"hf:{ident}: its config names the class {arch!r}, which transformers does not have"
            )
        model = cls.from_pretrained(ident, local_files_only=local).eval()
        processor = transformers.AutoImageProcessor.from_pretrained(ident, local_files_only=local)
    except OSError as exc:
        where = "not a local folder or in the Hugging Face cache"
        fix = (
            "pass --pretrained to download it"
            if not pretrained
            else "HF_HUB_OFFLINE=1 is set or the hub failed"
        )
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(
            f"cannot load hf:{ident}: {where}, or without an image processor (preprocessor_config.json; "
            f"save one with processor.save_pretrained(folder)); {fix} ({first})"
        ) from None
    prep, size = _hf_preprocessing(processor, ident)
    classes = None
    if arch.endswith("ForImageClassification") and getattr(config, "id2label", None):
        classes = [str(config.id2label[i]) for i in range(len(config.id2label))]
    named = {"model": model, "name": f"{HF_PREFIX}{ident}", "preprocessing": prep, "input_size": size}
    if dual_encoder(model) is not None:
        named |= {"image_text": model, "tokenizer": _hf_tokenizer(transformers, ident, local)}
    return named | {"classes": classes}


def _open_clip_source(spec: str, *, pretrained: bool, weights) -> tuple[str, str | None]:
    """(model name for open_clip, its ``pretrained=`` argument) of ``open_clip:spec``."""
    hub = spec.startswith("hf-hub:")
    arch, _, tag = (spec, "", "") if hub else spec.partition(":")
    if (hub or tag) and not pretrained:
        raise ValueError(
            f"open_clip:{spec} names pretrained weights: pass --pretrained to load them (the hub or the "
            "Hugging Face cache), or name the architecture alone with --weights FILE"
        )
    if pretrained and not (hub or tag):
        import open_clip  # type: ignore[import-untyped]

        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ValueError(f"--pretrained needs a tag: open_clip:{arch}:TAG, with TAG one of {tags}")
    if pretrained:
        return arch, tag or None  # hf-hub: open_clip reads the weights named with the config
    return arch, None if weights is None else str(weights)


def load_open_clip(spec: str, *, pretrained: bool, weights) -> dict:
    """The NamedModel fields of ``open_clip:spec``: its image tower in eval mode as the model, name,
    preprocessing, input size, and the whole model as image_text (open_clip tokenizes by itself)."""
    open_clip = _optional("open_clip", OPEN_CLIP_PREFIX)
    arch, source = _open_clip_source(spec, pretrained=pretrained, weights=weights)
    try:
        model = open_clip.create_model(arch, pretrained=source, require_pretrained=source is not None)
    except (RuntimeError, OSError) as exc:  # an unknown config or tag, weights that do not fit or load
        raise ValueError(
            f"cannot load open_clip:{spec}: {str(exc).splitlines()[0]} (open_clip.list_models() names "
            "the architectures, open_clip.list_pretrained() the tags)"
        ) from None
    cfg = open_clip.get_model_preprocess_cfg(model)
    if cfg.get("resize_mode", "shortest") not in ("shortest", "squash"):
        raise ValueError(
            f"open_clip:{spec} pads images (resize_mode {cfg['resize_mode']!r}); shapkern crops or resizes"
        )
    if cfg.get("interpolation", "bicubic") not in ("bilinear", "bicubic"):
        raise ValueError(
            f"open_clip:{spec} resizes with {cfg['interpolation']!r}; shapkern takes bilinear or bicubic"
        )
    size = cfg["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    crop_pct = (
        1.0 if cfg.get("resize_mode", "shortest") == "shortest" else None
    )  # resize the short side, crop
    prep = Preprocessing(
        "RGB",
        tuple(cfg["mean"]),
        tuple(cfg["std"]),
        crop_pct=crop_pct,
        interpolation=cfg.get("interpolation", "bicubic"),
    )
    model = model.eval()
    name = f"{OPEN_CLIP_PREFIX}{spec}"
    return {
        "model": model.visual,
        "name": name,
        "preprocessing": prep,
        "input_size": size,
        "image_text": model,
    }
