"""Shapley estimators above N = 16 on a trained model, where exact values are out of reach: the
evidence for what ``method="auto"`` picks at large N.

Game: the digits ShapleyViT at 32 px in 4-px patches (N = 64; trained with the CLI when missing
under ``--runs``: ``shapkern train --patch-size 4 --epochs 20``), the predicted class's logit on
the first ``--images`` test images, v_x(S) from the packed engine. Reference: shapkern ``kernel``
at ``--reference-budget`` evaluations per image (seed 10^6; its standard error, relative to the
values, is reported and must be far below the errors measured). At each budget, over ``--seeds``:
shapkern ``bayes``, ``leverage``, ``kernel`` and ``permutation`` (``shapkern.estimate``, all images
in one call) and, if shapiq is installed, its paired KernelSHAP and PermutationSamplingSV through
:class:`shapkern.integrations.shapiq.ShapkernGame` (one image per call, the same value function).
Relative L2 error against the reference (mean over seeds x images), precision@3, wall ms per image
(model time included for both libraries).

    OMP_NUM_THREADS=1 python -m benchmarks.estimators_large --out benchmarks/results/2026-11-26-cpu
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

from benchmarks import cases, harness
from shapkern.explainers import estimate
from shapkern.explainers.metrics import relative_l2, topk_precision
from shapkern.games import model_game

TRAIN_FLAGS = ["--patch-size", "4", "--epochs", "20", "--lam", "0.1", "--stop-grad"]  # as in estimators.py
SHAPKERN = ("bayes", "leverage", "kernel", "permutation")
SHAPIQ = {
    "KernelSHAP (paired)": ("KernelSHAP", {"pairing_trick": True}),
    "PermutationSamplingSV": ("PermutationSamplingSV", {}),
}
REFERENCE_SEED = 10**6
TOP = 3


def load_game(args):
    """The model, its first test images (B, C, H, W), their predicted classes (B,) and the game of
    those classes (a ValueFunction)."""
    from shapkern.cli.explain_inputs import load_model
    from shapkern.data import load_dataset

    path = cases.trained_checkpoint(args.runs, TRAIN_FLAGS)
    model, _ = load_model(str(path), torch.device("cpu"))
    bundle = load_dataset("digits", img_size=model.arch["img_size"], patch_size=model.arch["patch_size"])
    images = torch.stack([bundle.test[i][0] for i in range(args.images)])
    game = model_game(model, images)
    with torch.no_grad():
        targets = game(torch.ones(args.images, 1, game.players, dtype=torch.bool))[:, 0].argmax(-1)
    return model, images, targets, game.select(targets.unsqueeze(-1))


def run_shapkern(game, method: str, budget: int, seeds: int) -> tuple[torch.Tensor, float]:
    """(S, B, N) estimates and wall ms per image."""
    phis, start = [], time.perf_counter()
    for seed in range(seeds):
        phis.append(
            estimate(game, method=method, budget=budget, seed=seed, target="all", progress=False).values[
                ..., 0
            ]
        )
    return torch.stack(phis).double(), 1e3 * (time.perf_counter() - start) / (seeds * game.batch)


def run_shapiq(model, images, targets, method: str, budget: int, seeds: int) -> tuple[torch.Tensor, float]:
    import shapiq

    from shapkern.integrations.shapiq import ShapkernGame

    name, options = SHAPIQ[method]
    phis, elapsed = [], 0.0
    for seed in range(seeds):
        rows = []
        for image, target in zip(images, targets, strict=True):
            game = ShapkernGame(model, image, target=int(target))
            approximator = getattr(shapiq, name)(game.n_players, random_state=seed, **options)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                values = approximator.approximate(budget, game)
            elapsed += time.perf_counter() - start
            rows.append(torch.tensor([float(values[(i,)]) for i in range(game.n_players)]))
        phis.append(torch.stack(rows))
    return torch.stack(phis).double(), 1e3 * elapsed / (seeds * len(images))


def score(phi: torch.Tensor, reference: torch.Tensor) -> dict:
    flat, ref = phi.flatten(0, 1), reference.expand_as(phi).flatten(0, 1)
    return {
        "rel_l2": float(relative_l2(flat, ref).mean()),
        "p_at_3": float(topk_precision(flat, ref, TOP).mean()),
    }


def markdown(result: dict) -> str:
    env, args = result["environment"], result["arguments"]
    lines = [
        f"# Shapley estimators at N = {result['players']} on a trained ShapleyViT",
        "",
        (
            f"{harness.hardware_name(env)}, torch {env['torch']}, "
            f"shapiq {result['shapiq'] or 'not installed'}, {env['date']}. Digits ShapleyViT at 32 px in "
            "4-px patches (test accuracy "
            f"{100 * result['test_acc']:.1f}%), predicted class, first {args['images']} test images x "
            f"{args['seeds']} seeds. Reference: kernel at {args['reference_budget']:,} evaluations "
            f"(standard error {result['reference_rel_se']:.1e} of the values' norm). Wall time includes "
            "the model (shared machine: indicative)."
        ),
        "",
        f"    {result['command']}",
        "",
    ]
    rows = [
        [c["library"], c["method"], c["budget"], f"{c['rel_l2']:.4f}", f"{c['p_at_3']:.2f}", f"{c['ms']:.0f}"]
        for c in result["cells"]
    ]
    head = ["library", "method", "budget", "rel. L2 vs reference", "P@3", "ms/image"]
    lines += [harness.markdown_table(head, rows, align="llrrrr"), ""]
    for budget in args["budgets"]:
        cells = sorted((c for c in result["cells"] if c["budget"] == budget), key=lambda c: c["rel_l2"])
        best = cells[0]
        lines.append(
            f"- {budget} evaluations: best {best['library']} `{best['method']}` ({best['rel_l2']:.4f})."
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = harness.argument_parser(__doc__, device=False)
    parser.add_argument("--budgets", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--reference-budget", type=int, default=65536)
    parser.add_argument(
        "--runs", type=Path, default=harness.ROOT / "runs" / "estimators" / "vit_sv64", help="checkpoint"
    )
    parser.add_argument("--no-shapiq", dest="shapiq", action="store_false", help="shapkern only")
    args = parser.parse_args(argv)
    harness.configure_cpu_threads()
    model, images, targets, game = load_game(args)
    reference = estimate(
        game, method="kernel", budget=args.reference_budget, seed=REFERENCE_SEED, target="all", progress=False
    )
    ref = reference.values[..., 0].double()
    use_shapiq = args.shapiq and importlib.util.find_spec("shapiq") is not None
    cells = []
    for budget in args.budgets:
        for method in SHAPKERN:
            phi, ms = run_shapkern(game, method, budget, args.seeds)
            cells.append(
                {"library": "shapkern", "method": method, "budget": budget, "ms": ms, **score(phi, ref)}
            )
            print(cells[-1], flush=True)
        for method in SHAPIQ if use_shapiq else ():
            phi, ms = run_shapiq(model, images, targets, method, budget, args.seeds)
            cells.append(
                {"library": "shapiq", "method": method, "budget": budget, "ms": ms, **score(phi, ref)}
            )
            print(cells[-1], flush=True)
    metrics = [line for line in (args.runs / "metrics.jsonl").read_text().splitlines() if line.strip()]
    result = {
        "environment": harness.environment("cpu"),
        "command": harness.command_line(),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "players": game.players,
        "test_acc": json.loads(metrics[-1])["test_acc"],
        "shapiq": importlib.metadata.version("shapiq") if use_shapiq else None,
        "reference_rel_se": statistics.fmean(
            (reference.std_error[..., 0].norm(dim=-1) / reference.values[..., 0].norm(dim=-1)).tolist()
        ),
        "cells": cells,
    }
    out = harness.results_dir(args.out, "cpu")
    text = markdown(result)
    harness.write_results(out, "estimators_large", result, text)
    print(text)
    return result


if __name__ == "__main__":
    main()
