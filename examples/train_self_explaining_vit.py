"""Train a self-explaining ViT on digits through the Python API (what `shapkern train` does, by hand).

python examples/train_self_explaining_vit.py               # 4 epochs, then the exact check of 4 images
python examples/train_self_explaining_vit.py --epochs 30   # the full run of `shapkern train`

Measured: 94 s in all (26 s of training, about a minute for the exact check) on 2 AMD EPYC cores
shared with other jobs (1-minute load average 4.0-5.8, on 1 thread; 2026-12-07). Every phase shows
progress: a bar per epoch and one for the exact Shapley values.
"""

import argparse
import time

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import shapkern
from shapkern.coalitions import CoalitionSampler
from shapkern.data import load_dataset
from shapkern.explainers.metrics import relative_l2
from shapkern.models import ShapleyViT
from shapkern.threads import apply_thread_policy
from shapkern.training import ShapleyLoss, shapley_step


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=4, help="training epochs (30 for the full run)")
    parser.add_argument("--train-images", type=int, default=None, help="use only the first n train images")
    parser.add_argument("--exact-images", type=int, default=4, help="test images checked against exact")
    args = parser.parse_args(argv)

    # torch's threads as `shapkern train` picks them: fewer on a busy machine (shapkern/threads.py).
    print(f"threads: {apply_thread_policy()}", flush=True)
    torch.manual_seed(0)
    data = load_dataset("digits", img_size=32, patch_size=8)  # 16 patches = 16 players
    train = data.train
    if args.train_images:
        train = torch.utils.data.Subset(train, range(args.train_images))
    model = ShapleyViT(
        "vit_tiny_patch16_224",
        data.num_classes,
        img_size=32,
        patch_size=8,
        depth=3,
        embed_dim=64,
        num_heads=2,
    )
    loss_fn = ShapleyLoss(lam=1.0, mu=1.0, mask_loss="kl")  # L = ℓ_cls + λ ℓ_sv + μ ℓ_mask
    # 8 coalitions per image from the Shapley kernel, in complementary pairs, seeded per sample and epoch.
    sampler = CoalitionSampler(num=8, sampler="shapley", paired=True, seed=0)
    loader = DataLoader(train, batch_size=64, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, 1e-3, total_steps=args.epochs * len(loader), pct_start=0.05
    )

    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        for images, labels, index in tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False):
            coalitions = sampler(index, epoch, model.num_players)
            # One packed engine pass gives Φ(x), f(x) and v_x(S); the loss takes those outputs.
            out = shapley_step(model, loss_fn, images, labels, coalitions, paired=sampler.paired)
            optimizer.zero_grad()
            out.total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
        parts = " ".join(f"{k} {v:.3f}" for k, v in out.components().items())
        print(f"epoch {epoch + 1}/{args.epochs}: {parts} ({time.perf_counter() - start:.0f} s)", flush=True)

    model.eval()
    test_images, test_labels = data.test.images, data.test.labels
    with torch.no_grad():
        phi, logits, _ = model(test_images)  # Φ (B, 16, 10) and f(x) = Σ_n Φ_n
    accuracy = float((logits.argmax(-1) == test_labels).float().mean())
    print(f"test accuracy {accuracy:.3f}")

    # Faithfulness: Φ against the exact Shapley values of the model's own game (2^16 coalitions).
    count = args.exact_images
    print(
        f"exact Shapley values of {count} test image(s): {2**model.num_players:,} coalitions each", flush=True
    )
    exact = shapkern.explain(
        model, test_images[:count], method="exact", target="all"
    ).values  # a progress bar
    error = float(relative_l2(phi[:count], exact).mean())
    print(f"relative error vs exact Shapley values: {error:.3f}")
    return {"accuracy": accuracy, "relative_error": error}


if __name__ == "__main__":
    main()
