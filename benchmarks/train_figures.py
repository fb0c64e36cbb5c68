"""The README figures of self-explaining training on digits, from real runs.

(1) test accuracy at λ = 0 against λ ∈ {0.1, 1, 10}; (2) faithfulness ‖Φ(x) - φ_exact‖ / ‖φ_exact‖
against the exact Shapley values of the model's own value function (all 2^16 coalitions through
the engine) on test images; (3) training throughput in images/s (median over the run's logged
intervals). Writes train_figures-<device>.{json,md}.

    python -m benchmarks.train_figures [--lams 0 0.1 1 10] [--faith-images 100] [--epochs N]
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch

from benchmarks import harness
from shapkern import explain
from shapkern.explainers.metrics import relative_l2
from shapkern.training import TrainConfig, Trainer


def _centre(values: torch.Tensor) -> torch.Tensor:
    # Less the mean over classes (B, N, K): the part of Φ that softmax sees.
    return values - values.mean(-1, keepdim=True)


def exact_faithfulness(trainer: Trainer, count: int, batch: int = 2) -> dict:
    model = trainer.model.eval()
    errors, centred = [], []
    start = time.perf_counter()
    count = min(count, len(trainer.test_set))
    for first in range(0, count, batch):
        images = torch.stack([trainer.test_set[i][0] for i in range(first, min(first + batch, count))])
        images = images.to(trainer.device)
        with torch.no_grad():
            phi = model(images).phi
        exact = explain(model, images, method="exact", target="all", progress=False).values
        errors += relative_l2(phi, exact).tolist()
        centred += relative_l2(_centre(phi), _centre(exact)).tolist()
    return {
        "images": count,
        "rel_err_mean": statistics.fmean(errors),
        "rel_err_centred_mean": statistics.fmean(centred),
        "rel_err_median": statistics.median(errors),
        "seconds": time.perf_counter() - start,
    }


def markdown(result: dict) -> str:
    env, config = result["environment"], result["config"]
    table = []
    for r in result["runs"]:
        exact = r.get("faith_exact")
        table.append(
            [
                f"{r['lam']:g}",
                f"{r['mu']:g}",
                f"{100 * r['test_acc']:.1f}%",
                f"{r['test_sv']:.4f}",
                f"{exact['rel_err_mean']:.3f} ({exact['images']} images)" if exact else "—",
                f"{r['images_per_s']:.0f}",
            ]
        )
    headers = [
        "λ",
        "μ",
        "test accuracy",
        "held-out ℓ_sv",
        "rel. error vs exact Shapley (2^16 coalitions)",
        "train images/s",
    ]
    lines = [
        (
            f"Digits, {config['epochs']} epochs, mask loss {config['mask_loss']}, "
            f"{harness.hardware_name(env)}, torch {env['torch']}, {env['date']}. λ = μ = 0 is "
            f"classification only. Command: `{result['command']}`"
        ),
        "",
        harness.markdown_table(headers, table, align="rrrrrr"),
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = harness.argument_parser(__doc__.split("\n\n")[0], device=False)
    parser.add_argument("--lams", type=float, nargs="+", default=[0.0, 0.1, 1.0, 10.0], help="values of λ")
    parser.add_argument(
        "--faith-lams",
        type=float,
        nargs="+",
        default=[TrainConfig.lam],
        help="λ values checked against exact",
    )
    parser.add_argument("--faith-images", type=int, default=100, help="test images checked against exact")
    parser.add_argument(
        "--epochs", type=int, help=f"training epochs (default: TrainConfig's, {TrainConfig.epochs})"
    )
    parser.add_argument("--runs", default="runs/figures", help="folder of the training runs")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    # Classification only (λ = μ = 0) first, then λ at the default μ and mask loss.
    runs = [(0.0, 0.0)] + [(lam, TrainConfig.mu) for lam in args.lams]
    for lam, mu in runs:
        out = os.path.join(args.runs, f"lam{lam:g}-mu{mu:g}")
        cfg = TrainConfig(lam=lam, mu=mu, out=out, progress=False, overwrite=True)  # a rerun replaces it
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
        "environment": harness.environment(device),
        "command": harness.command_line(),
        "config": config,
        "runs": rows,
    }
    out = harness.results_dir(args.out, device)
    harness.write_results(out, f"train_figures-{device}", result, markdown(result))
    print(markdown(result))
    print(f"wrote {out}/train_figures-{device}.{{json,md}}")


if __name__ == "__main__":
    main()
