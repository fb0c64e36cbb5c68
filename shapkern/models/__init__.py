"""Models built on the engine: the self-explaining ViT and its timm backbones."""

from shapkern.models.backbones import (
    create_backbone,
    load_backbone_weights,
    native_input,
    pretrained_normalization,
)
from shapkern.models.shapley_vit import HEADS, Head, ShapleyOutput, ShapleyViT

__all__ = [
    "HEADS",
    "Head",
    "ShapleyOutput",
    "ShapleyViT",
    "create_backbone",
    "load_backbone_weights",
    "native_input",
    "pretrained_normalization",
]
