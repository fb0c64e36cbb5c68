"""Train a self-explaining ViT on digits through the Python API (what `shapkern train` does, by hand).

python examples/train_self_explaining_vit.py
"""

import torch
from torch.utils.data import DataLoader

import shapkern
from shapkern.coalitions import seeded_coalitions
from shapkern.data import load_dataset
from shapkern.explainers.metrics import relative_l2
from shapkern.models import ShapleyViT
from shapkern.training import ShapleyLoss

torch.manual_seed(0)
data = load_dataset("digits", img_size=32, patch_size=8)  # 16 patches = 16 players
model = ShapleyViT(
    "vit_tiny_patch16_224", data.num_classes, img_size=32, patch_size=8, depth=3, embed_dim=64, num_heads=2
)
loss_fn = ShapleyLoss(lam=0.1, mu=1.0, num_coalitions=8, mask_loss="kl")  # L = ℓ_cls + λ ℓ_sv + μ ℓ_mask
epochs = 30
loader = DataLoader(data.train, batch_size=64, shuffle=True)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
schedule = torch.optim.lr_scheduler.OneCycleLR(
    optimizer, 1e-3, total_steps=epochs * len(loader), pct_start=0.05
)

for epoch in range(epochs):
    model.train()
    for images, labels, index in loader:
        # Coalitions seeded per (seed, epoch, sample): one packed engine pass gives Φ(x), f(x), v_x(S).
        coalitions = seeded_coalitions(index, seed=0, epoch=epoch, num=8, players=model.num_players)
        out = loss_fn(model, images, labels, coalitions)
        optimizer.zero_grad()
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    print(f"epoch {epoch + 1}: " + " ".join(f"{k} {v:.3f}" for k, v in out.components().items()))

model.eval()
test_images, test_labels = data.test.images, data.test.labels
with torch.no_grad():
    phi, logits, _ = model(test_images)  # Φ (B, 16, 10) and f(x) = Σ_n Φ_n
print(f"test accuracy {(logits.argmax(-1) == test_labels).float().mean():.3f}")

# Faithfulness: Φ against the exact Shapley values of the model's own game (2^16 coalitions).
exact = shapkern.explain(model, test_images[:4], method="exact", target="all", progress=False).values
print(f"relative error vs exact Shapley values: {relative_l2(phi[:4], exact).mean():.3f}")
