"""Models built on the engine: the self-explaining ViT and its timm backbones."""

from shapkern.models.backbones import create_backbone, load_backbone_weights
from shapkern.models.shapley_vit import HEADS, ShapleyOutput, ShapleyViT

__all__ = ["HEADS", "ShapleyOutput", "ShapleyViT", "create_backbone", "load_backbone_weights"]
