"""The README figures of self-explaining training on digits, from real runs.

(1) test accuracy at λ = 0 against λ ∈ {0.1, 1, 10}; (2) faithfulness ‖Φ(x) - φ_exact‖ / ‖φ_exact‖
against the exact Shapley values of the model's own value function (all 2^16 coalitions through
the engine) on test images; (3) training throughput in images/s. Writes
benchmarks/results/train_figures-<device>.{json,md}.

    python benchmarks/train_figures.py [--lams 0 0.1 1 10] [--faith-images 100] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time

import torch

from shapkern import explain
from shapkern.explainers.metrics import relative_l2
from shapkern.training import TrainConfig, Trainer


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout
        return next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
        )
    except Exception:  # noqa: BLE001
        return platform.processor() or "unknown CPU"


def exact_faithfulness(trainer: Trainer, count: int, batch: int = 2) -> dict:
    model = trainer.model.eval()
    errors = []
    start = time.perf_counter()
    count = min(count, len(trainer.test_set))
    for first in range(0, count, batch):
        images = torch.stack([trainer.test_set[i][0] for i in range(first, min(first + batch, count))])
        images = images.to(trainer.device)
        with torch.no_grad():
            phi = model(images).phi
        exact = explain(model, images, method="exact", target="all", progress=False).values
        errors += relative_l2(phi, exact).tolist()
    return {
        "images": count,
        "rel_err_mean": statistics.fmean(errors),
        "rel_err_median": statistics.median(errors),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lams", type=float, nargs="+", default=[0.0, 0.1, 1.0, 10.0])
    parser.add_argument("--faith-lams", type=float, nargs="+", default=[TrainConfig.lam])
    parser.add_argument("--faith-images", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--out", default="runs/figures")
    parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hardware = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"{cpu_name()}, {torch.get_num_threads()} threads"
    )
    rows = []
    # Classification only (λ = μ = 0) first, then λ at the default μ and mask loss.
    runs = [(0.0, 0.0)] + [(lam, TrainConfig.mu) for lam in args.lams]
    for lam, mu in runs:
        cfg = TrainConfig(lam=lam, mu=mu, out=os.path.join(args.out, f"lam{lam:g}-mu{mu:g}"), progress=False)
        if args.epochs:
            cfg.epochs = args.epochs
        trainer = Trainer(cfg)
        start = time.perf_counter()
        last = trainer.fit()
        with open(os.path.join(cfg.out, "metrics.jsonl")) as f:
            lines = [json.loads(line) for line in f]
        row = {
            "lam": lam,
            "mu": mu,
            "test_acc": last["test_acc"],
            "test_sv": last["test_sv"],
            "faith_perm_rel_err": last.get("faithfulness_rel_err"),
            "images_per_s": statistics.median(r["images_per_s"] for r in lines),
            "train_seconds": time.perf_counter() - start,
        }
        if (mu == 0 or lam in args.faith_lams) and args.faith_images:
            row["faith_exact"] = exact_faithfulness(trainer, args.faith_images)
        rows.append(row)
        print(json.dumps(row), flush=True)
    config = {k: v for k, v in vars(TrainConfig()).items() if k not in ("out", "lam", "mu")}
    if args.epochs:
        config["epochs"] = args.epochs
    result = {
        "hardware": hardware,
        "torch": torch.__version__,
        "device": device,
        "config": config,
        "runs": rows,
    }
    os.makedirs(args.results, exist_ok=True)
    stem = os.path.join(args.results, f"train_figures-{device}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    lines = [
        (
            f"Digits, {config['epochs']} epochs, mask loss {config['mask_loss']}, {hardware}, "
            f"torch {torch.__version__}. λ = μ = 0 is classification only."
        ),
        "",
        "| λ | μ | test accuracy | held-out ℓ_sv | rel. error vs exact Shapley (2^16 coalitions) | train images/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        exact = r.get("faith_exact")
        faith = f"{exact['rel_err_mean']:.3f} ({exact['images']} images)" if exact else "—"
        lines.append(
            f"| {r['lam']:g} | {r['mu']:g} | {100 * r['test_acc']:.1f}% | {r['test_sv']:.4f} | {faith} | {r['images_per_s']:.0f} |"
        )
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
