"""Image-text models (dual encoders) of other libraries, as the image-text game reads them: the image
tower the packed engine runs, the projection of its output into the joint space (if the model keeps it
outside the tower), the text encoder, and the model's temperature and bias.

- open_clip ``CLIP`` and ``CustomTextCLIP``: the tower is ``model.visual`` (its output is the projected
  embedding), texts go through ``model.encode_text``; strings through open_clip's own tokenizer for a
  ``CLIP`` with its default vocabulary (shipped with open_clip: no download).
- Hugging Face ``CLIPModel`` and ``SiglipModel``: the tower is ``model.vision_model`` (a
  ``CLIPVisionModel`` or ``SiglipVisionModel``), then ``visual_projection`` (CLIP); texts go through
  ``get_text_features`` as token ids (their tokenizers are files: pass one, or the ids).

Importing this module imports neither library: a model is recognised by the module and name of its class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from shapkern.engine.adapters.base import Submodule

__all__ = ["DualEncoder", "dual_encoder"]

OPEN_CLIP_VOCAB = 49408  # the vocabulary of open_clip's default tokenizer (SimpleTokenizer)


@dataclass
class DualEncoder:
    """What the image-text game needs of a dual encoder.

    Attributes:
        family: a name for messages.
        image: the image tower, a model the packed engine runs: images -> (B, D') per coalition.
        project: (..., D') -> (..., D) into the joint space, or None when the tower's output is there.
        encode_tokens: token ids (K, L) int64 -> text embeddings (K, D).
        tokenize: strings -> token ids (K, L), when the model's tokenizer is available offline.
        logit_scale: () the factor of the cosine similarity (exp of the learned temperature).
        logit_bias: () the bias added to it (SigLIP), or None.
    """

    family: str
    image: nn.Module
    project: Callable[[torch.Tensor], torch.Tensor] | None
    encode_tokens: Callable[[torch.Tensor], torch.Tensor]
    tokenize: Callable[[Sequence[str]], torch.Tensor] | None
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None


def _class(model: nn.Module) -> tuple[str, str]:
    return type(model).__module__, type(model).__name__


def _open_clip(model: Submodule) -> DualEncoder:
    tokenize = None
    if _class(model)[1] == "CLIP" and model.vocab_size == OPEN_CLIP_VOCAB:
        import open_clip  # type: ignore[import-untyped]  # the model is one: it is installed

        context = model.context_length
        tokenize = lambda texts: open_clip.tokenize(list(texts), context_length=context)  # noqa: E731
    bias = getattr(model, "logit_bias", None)
    return DualEncoder(
        family=f"open_clip {_class(model)[1]}",
        image=model.visual,
        project=None,
        encode_tokens=model.encode_text,
        tokenize=tokenize,
        logit_scale=model.logit_scale.exp().reshape(()),
        logit_bias=None if bias is None else bias.reshape(()),
    )


def _hugging_face(model: Submodule) -> DualEncoder:
    clip = _class(model)[1] == "CLIPModel"
    return DualEncoder(
        family=f"Hugging Face {_class(model)[1]}",
        image=model.vision_model,
        project=model.visual_projection if clip else None,
        encode_tokens=lambda ids: model.get_text_features(input_ids=ids).pooler_output,
        tokenize=None,
        logit_scale=model.logit_scale.exp().reshape(()),
        logit_bias=None if clip else model.logit_bias.reshape(()),
    )


FAMILIES: dict[tuple[str, str], Callable[[Submodule], DualEncoder]] = {
    ("open_clip.model", "CLIP"): _open_clip,
    ("open_clip.model", "CustomTextCLIP"): _open_clip,
    ("transformers.models.clip.modeling_clip", "CLIPModel"): _hugging_face,
    ("transformers.models.siglip.modeling_siglip", "SiglipModel"): _hugging_face,
}


def dual_encoder(model: nn.Module) -> DualEncoder | None:
    """The dual encoder ``model`` is (open_clip CLIP or CustomTextCLIP, Hugging Face CLIPModel or
    SiglipModel), or None for any other model."""
    read = FAMILIES.get(_class(model))
    return None if read is None else read(model)
