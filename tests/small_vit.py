"""Small timm ViTs for the block-path tests (test_engine_blocks.py, test_engine_fp8.py): 32 px images in
8 px patches (N = 16), two blocks of width 32, five classes, in the variants the fused paths support."""

import torch
from timm.models.vision_transformer import VisionTransformer

SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5}
VARIANTS = {
    "cls_token": {},
    "avg_pool": {"global_pool": "avg"},
    "registers": {"reg_tokens": 2},
    "layer_scale": {"init_values": 0.1},
    "qk_norm": {"qk_norm": True},
}


def make_model(variant: str = "cls_token", **extra) -> VisionTransformer:
    """A seeded model in eval mode; ``extra`` goes to VisionTransformer (e.g. mlp_layer, drop_path_rate)."""
    torch.manual_seed(0)
    model = VisionTransformer(**SMALL, **VARIANTS[variant], **extra).eval()
    with torch.no_grad():  # timm zero-inits some parameters; make every one of them matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model
