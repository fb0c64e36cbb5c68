"""Put a hand-written PyTorch ViT on shapkern's packed coalition path.

The model below is an ordinary ViT. The conversion (marked) adds a packed forward that reuses
its modules: pack the embedded tokens of every (image, coalition) pair, swap dense attention for
``shapkern.packed.varlen_attention``, and pool each sequence's class token. The script checks the
packed outputs against the original model run with a key mask that hides the absent patches.

    python examples/drop_in_custom_vit.py
"""

import torch
import torch.nn.functional as F
from torch import nn

import shapkern
import shapkern.packed as snn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, key_mask=None):  # x: (B, L, D), key_mask: bool (B, L)
        b, length, dim = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, length, dim))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, key_mask=None):
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, img_size=32, patch=8, dim=64, depth=3, heads=4, classes=10):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + (img_size // patch) ** 2, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def embed(self, images):  # (B, 3, H, W) -> (B, 1 + N, D)
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed

    def forward(self, images, key_mask=None):
        x = self.embed(images)
        for block in self.blocks:
            x = block(x, key_mask)
        return self.head(self.norm(x)[:, 0])


# --- the conversion: 14 lines -------------------------------------------------------------------
def packed_attention(attn, x, plan):  # x: (T, D) packed tokens
    q, k, v = attn.qkv(x).view(len(x), 3, attn.heads, -1).unbind(1)
    out = snn.varlen_attention(q, k, v, plan.cu_seqlens, plan.max_seqlen)
    return attn.proj(out.reshape(len(x), -1))


def packed_forward(model, images, coalitions):  # coalitions: bool (B, M, N) -> (B, M, K)
    x, plan = snn.pack_tokens(model.embed(images), coalitions, num_prefix_tokens=1)
    for block in model.blocks:
        x = x + packed_attention(block.attn, block.norm1(x), plan)
        x = x + block.mlp(block.norm2(x))
    cls = snn.first_tokens(model.norm(x), plan, 1)[:, 0]
    return model.head(cls).view(*coalitions.shape[:2], -1)


# -------------------------------------------------------------------------------------------------


def main() -> float:
    torch.manual_seed(0)
    model = TinyViT().eval()
    images = torch.randn(4, 3, 32, 32)
    coalitions = shapkern.sample_coalitions(4, 8, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        packed = packed_forward(model, images, coalitions)
        key_mask = torch.cat([torch.ones(32, 1, dtype=torch.bool), coalitions.view(32, 16)], 1)
        masked = model(images.repeat_interleave(8, 0), key_mask).view(4, 8, -1)
    error = ((packed - masked).norm() / masked.norm()).item()
    evaluations = coalitions.numel() // 16
    print(f"packed vs key-masked original: relative error {error:.1e} over {evaluations} evaluations")
    return error


if __name__ == "__main__":
    assert main() < 1e-5
