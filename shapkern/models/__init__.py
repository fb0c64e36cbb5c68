"""Models built on the engine: the self-explaining ViT and its timm backbones, and the self-explaining
image-text model with its text encoder."""

from shapkern.models.backbones import (
    check_model_name,
    create_backbone,
    hub_error,
    load_backbone_weights,
    native_input,
    pretrained_normalization,
    read_state_dict,
)
from shapkern.models.image_text import (
    CONTRASTIVES,
    Contrastive,
    ImageTextOutput,
    ShapleyCLIP,
    self_explaining_from_state,
)
from shapkern.models.shapley_vit import HEADS, Head, ShapleyOutput, ShapleyViT
from shapkern.models.text import PAD, UNK, TextEncoder, WordTokenizer

__all__ = [
    "CONTRASTIVES",
    "HEADS",
    "PAD",
    "UNK",
    "Contrastive",
    "Head",
    "ImageTextOutput",
    "ShapleyCLIP",
    "ShapleyOutput",
    "ShapleyViT",
    "TextEncoder",
    "WordTokenizer",
    "check_model_name",
    "create_backbone",
    "hub_error",
    "load_backbone_weights",
    "native_input",
    "pretrained_normalization",
    "read_state_dict",
    "self_explaining_from_state",
]
