"""The tiny models every test builds: timm ViTs in the variants the packed engine runs, and
self-explaining ViTs (conftest.py puts this folder on sys.path: ``from tiny_models import ...``).

Sizes: SMALL is 32 px images in 8 px patches (N = 16), two blocks of width 32, five classes; TINY is
24 px in 8 px patches (N = 9), one block of width 16, four classes.
"""

import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from shapkern.models import ShapleyViT

SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5}
TINY = {"img_size": 24, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2, "num_classes": 4}
# Every variant of timm's VisionTransformer that the packed engine runs.
VARIANTS = {
    "cls_token": {},
    "cls_avg": {"global_pool": "avg"},
    "no_prefix_avg": {"class_token": False, "global_pool": "avg"},
    "registers": {"reg_tokens": 2},
    "no_embed_class": {"reg_tokens": 1, "no_embed_class": True},
    "qk_norm": {"qk_norm": True},
    "layer_scale": {"init_values": 0.1},
    "deep_small_patch": {"patch_size": 4, "depth": 3, "embed_dim": 48, "num_heads": 3, "mlp_ratio": 2.0},
    "distilled": {"distilled": True},
}
# Those the fused and fp8 block paths run (test_engine_blocks.py, test_engine_fp8.py).
BLOCK_VARIANTS = ("cls_token", "cls_avg", "registers", "layer_scale", "qk_norm")
# The sizes of a self-explaining ViT: 16 px images in 4 px patches (N = 16).
SHAPLEY_SIZES = {"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2}


def tiny_vit(variant: str = "cls_token", *, seed: int = 0, noise: float = 0.05, sizes=SMALL, **extra):
    """A seeded timm ViT of ``sizes`` in a VARIANTS variant, in eval mode, every parameter moved by
    ``noise`` standard normals (timm zero-inits some; they must all matter). ``extra`` goes to the
    model class (e.g. mlp_layer, drop_path_rate)."""
    torch.manual_seed(seed)
    kwargs = {**sizes, **VARIANTS[variant], **extra}
    cls = VisionTransformerDistilled if kwargs.pop("distilled", False) else VisionTransformer
    model = cls(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    return model


def tiny_shapley_vit(num_classes: int = 3, head: str = "linear", *, seed: int = 0, **sizes) -> ShapleyViT:
    """A seeded ShapleyViT on a ``vit_tiny_patch16_224`` backbone of SHAPLEY_SIZES updated by
    ``sizes``, in eval mode."""
    torch.manual_seed(seed)
    return ShapleyViT("vit_tiny_patch16_224", num_classes, head, **(SHAPLEY_SIZES | sizes)).eval()
