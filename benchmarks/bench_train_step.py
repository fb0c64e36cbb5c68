"""One ShapleyViT training step with shapkern against the same losses by zero-input masking.

    python benchmarks/bench_train_step.py [--device cuda|cpu] [--images B] [--coalitions M]

shapkern: one packed engine pass gives Φ(x), f(x) and v_x(S) for B images × M coalitions
(design.md §2). Baseline: the same ShapleyLoss, with Φ(x) from timm's plain forward and v_x(S)
from a plain forward of each of the B·M zero-masked images. Both run forward, backward and an
AdamW step. Reports steps/s and images/s; writes train_step.{json,md} under
benchmarks/results/<date>-<device>/.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import common
import torch
from torch import nn

import shapkern


class FlatPhi(nn.Module):
    """(b, C, H, W) -> Φ as (b, N·K): masked_input_forward wants one vector per image."""

    def __init__(self, model: shapkern.ShapleyViT):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)[0].flatten(1)


class ZeroInputShapleyViT(nn.Module):
    """A ShapleyViT whose coalition values come from pixel-masked plain forwards."""

    def __init__(self, model: shapkern.ShapleyViT):
        super().__init__()
        self.model = model
        self.flat_phi = FlatPhi(model)
        self.num_players, self.num_classes = model.num_players, model.num_classes

    def forward(self, images, coalitions, paired=False):
        phi, logits, _ = self.model(images)
        batch, num, players = coalitions.shape
        masked_phi = shapkern.masked_input_forward(self.flat_phi, images, coalitions, chunk_size=1 << 30)
        masked_phi = masked_phi.view(batch, num, players, -1)
        values = (masked_phi * coalitions.unsqueeze(-1)).sum(2)  # v(S) = Σ_{n∈S} Φ(x_S)_n
        return shapkern.ShapleyOutput(phi, logits, values)

    forward_coalitions = forward


def step(model, loss_fn, optimizer, images, labels, coalitions):
    optimizer.zero_grad(set_to_none=True)
    loss_fn(model, images, labels, coalitions).total.backward()
    optimizer.step()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default=common.default_device(), choices=["cuda", "cpu"])
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--coalitions", type=int, default=None, help="paired coalitions per image")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    device = torch.device(args.device)
    common.configure_cpu_threads()
    if cuda:  # ViT-B/16 at 224 px, ViT-Shapley's M = 32
        backbone = {"name": "vit_base_patch16_224", "img": 224, "kwargs": {}}
        batch, num = args.images or 32, args.coalitions or 32
    else:  # the digits default of `shapkern train`
        cfg = shapkern.TrainConfig()
        kwargs = {
            "patch_size": cfg.patch_size,
            "depth": cfg.depth,
            "embed_dim": cfg.embed_dim,
            "num_heads": cfg.num_heads,
        }
        backbone = {"name": cfg.model, "img": cfg.img_size, "kwargs": kwargs}
        batch, num = args.images or 64, args.coalitions or cfg.num_coalitions
    torch.manual_seed(0)
    model = shapkern.ShapleyViT(backbone["name"], 10, img_size=backbone["img"], **backbone["kwargs"]).to(
        device
    )
    images = torch.randn(batch, 3, backbone["img"], backbone["img"], device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    coalitions = shapkern.sample_coalitions(batch, num, model.num_players, device=device)
    loss_fn = shapkern.ShapleyLoss(lam=0.1, mu=1.0, num_coalitions=num, mask_loss="kl")
    rows = []
    for name, wrapped in (
        ("shapkern engine", model),
        ("zero-input masking, timm forward", ZeroInputShapleyViT(model)),
    ):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=cuda):
            stats = common.time_fn(
                partial(step, wrapped, loss_fn, optimizer, images, labels, coalitions),
                device,
                repeats=args.repeats,
            )
        stats["steps_per_s"] = 1e3 / stats["median_ms"]
        stats["images_per_s"] = batch * stats["steps_per_s"]
        rows.append({"method": name, **stats})
        print(
            f"{name:<34} {stats['steps_per_s']:8.2f} steps/s  {stats['images_per_s']:10.1f} images/s",
            flush=True,
        )
    for row in rows:
        row["speedup_vs_zero_input"] = row["steps_per_s"] / rows[1]["steps_per_s"]
    env = common.environment(device)
    result = {
        "environment": env,
        "config": {"model": backbone, "images": batch, "coalitions": num, "autocast_bf16": cuda},
        "rows": rows,
    }
    lines = [
        f"# ShapleyViT training step on {common.hardware_name(env)}",
        "",
        (
            f"{backbone['name']} {backbone['kwargs'] or ''} at {backbone['img']} px, {batch} images × {num} paired "
            f"coalitions, λ = 0.1, μ = 1 (KL); torch {env['torch']}, triton {env['triton']}, {env['date']}."
        ),
        "",
        "| method | steps/s | images/s | speedup |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r['steps_per_s']:.2f} | {r['images_per_s']:.1f} | ×{r['speedup_vs_zero_input']:.2f} |"
        for r in rows
    ]
    out = common.results_dir(args.out, args.device)
    common.write_results(out, "train_step", result, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
