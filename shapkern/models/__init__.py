"""Models built on the engine: the self-explaining ViT and its timm backbones."""

from shapkern.models.backbones import (
    check_model_name,
    create_backbone,
    hub_error,
    load_backbone_weights,
    native_input,
    pretrained_normalization,
    read_state_dict,
)
from shapkern.models.shapley_vit import HEADS, Head, ShapleyOutput, ShapleyViT

__all__ = [
    "HEADS",
    "Head",
    "ShapleyOutput",
    "ShapleyViT",
    "check_model_name",
    "create_backbone",
    "hub_error",
    "load_backbone_weights",
    "native_input",
    "pretrained_normalization",
    "read_state_dict",
]
