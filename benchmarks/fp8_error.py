"""Shapley values with fp8 GEMMs against fp32, next to KernelSHAP's sampling error (issue #13, item 2).

The fp8 engine (``precision="fp8"``: e4m3 qkv, proj, fc1 and fc2 GEMMs) costs nothing a user can see if
its error on the Shapley values is smaller than the sampling error of KernelSHAP at 2,048 evaluations on
the same images. Two games, explained for the class the fp32 model predicts:

(a) digits: a ShapleyViT (32 px, 8 px patches, N = 16) from ``shapkern train``. Exact Shapley values
    (2^16 coalitions) of its value function v_x(S) = Σ_{n∈S} Φ(x_S)_n with the encoder at each
    precision. Sampling error: KernelSHAP at 2,048 evaluations, seeds 1..--seeds, against the exact fp32
    values (mean over seeds).
(b) vit_base_patch16_224, timm's random init (seed 0), at 224 px (N = 196). KernelSHAP at 2,048
    evaluations with seed 0 at each precision: the same coalitions, so the difference is the fp8 error
    alone. Sampling error: fp32 KernelSHAP at 2,048 evaluations with seeds 0..k-1 (k = --vit-seeds)
    against their pooled mean (a k x 2,048-evaluation estimate), scaled by sqrt(k / (k - 1)) because the
    pooled mean shares each run's noise; with k = 2 this is ||φ_0 - φ_1|| / sqrt(2). With k = 1 (the CPU
    default) the sampling error is KernelSHAP's own standard error of the seed-0 run (see below), which
    (a) checks against the true sampling error.

Errors are relative L2 norms over all images, ||φ - φ_ref|| / ||φ_ref||. "KernelSHAP SE" is KernelSHAP's
own sandwich standard error at 2,048 evaluations, sqrt(Σ se²) / ||φ||, a second estimate of its
sampling error from the seed-0 run. Precisions: fp32 (the reference), fp8 (e4m3 GEMMs, everything else
fp32), bf16 (autocast) and fp8 + bf16 (fp8 GEMMs under bf16 autocast: what a GPU runs). The CPU
computes the fp8 numerics exactly (the engine's fp8 path is the plain path with e4m3-rounded GEMM
operands), but vit_base costs ~0.3 s per evaluation on one CPU core: the CPU default runs (a) only
(minutes); ``--vit-images 1`` adds (b) with fp8 alone (2 x 2,048 evaluations, ~25 min on one core). On
CUDA both run by default.

    python -m benchmarks.fp8_error --checkpoint runs/digits/checkpoint.pt --out DIR  # CPU: (a), minutes
    python -m benchmarks.fp8_error --checkpoint runs/digits/checkpoint.pt --vit-images 1 --out DIR  # + (b)
    python -m benchmarks.fp8_error --device cuda --out DIR  # trains the digits model first (~1 min)

Writes fp8_error.{json,md}.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from benchmarks import harness
from shapkern.data import load_dataset
from shapkern.explainers import estimate
from shapkern.games import Game, model_game
from shapkern.models import ShapleyViT

# name -> (engine precision, bf16 autocast)
PRECISIONS = {
    "fp32": ("auto", False),
    "fp8": ("fp8", False),
    "bf16": ("auto", True),
    "fp8 + bf16": ("fp8", True),
}


def shapley_vit_game(model: ShapleyViT, images: torch.Tensor, precision: str) -> Game:
    """v_x(S) of a ShapleyViT with its encoder at ``precision`` (its own value function)."""
    return model_game(model, images, precision=precision)


def run(game_at, name: str, device: torch.device, **kwargs):
    """Attribution of the game at precision ``name`` (kwargs for :func:`estimate`) and its wall time."""
    precision, autocast = PRECISIONS[name]
    harness.synchronize(device)
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        att = estimate(game_at(precision), progress=False, **kwargs)
    harness.synchronize(device)
    return att, time.perf_counter() - start


def predicted_class(game: Game) -> torch.Tensor:
    """(B, 1) argmax of v(N) in fp32."""
    with torch.no_grad():
        full = game(torch.ones(game.batch, 1, game.players, dtype=torch.bool, device=game.device))
    return full[:, 0].argmax(-1, keepdim=True)


def standard_error(att) -> float:
    return float(att.std_error.double().norm() / att.values.double().norm())


def digits_rows(args, device: torch.device) -> dict:
    checkpoint = args.checkpoint or train_digits(args, device)
    model = ShapleyViT.from_checkpoint(checkpoint, map_location=device)
    bundle = load_dataset("digits", img_size=32, patch_size=8, seed=args.seed)
    images = torch.stack([bundle.test[i][0] for i in range(args.images)]).to(device)
    target = predicted_class(shapley_vit_game(model, images, "auto"))

    def game_at(precision):
        return shapley_vit_game(model, images, precision)

    exact, seconds = run(
        game_at, "fp32", device, method="exact", target=target, coalitions_per_call=args.batch_size
    )
    rows = {"fp32": {"seconds": seconds, "full_error": 0.0, "phi_error": 0.0}}
    for name in args.digits_precisions:
        att, seconds = run(
            game_at, name, device, method="exact", target=target, coalitions_per_call=args.batch_size
        )
        rows[name] = {
            "seconds": seconds,
            "full_error": harness.relative_error(att.full, exact.full),
            "phi_error": harness.relative_error(att.values, exact.values),
        }
    sampling = []
    for seed in range(1, args.seeds + 1):
        att, _ = run(
            game_at,
            "fp32",
            device,
            method="kernel",
            budget=args.budget,
            seed=seed,
            target=target,
            coalitions_per_call=args.batch_size,
        )
        sampling.append((harness.relative_error(att.values, exact.values), standard_error(att)))
    return {
        "model": "digits ShapleyViT",
        "checkpoint": str(checkpoint),
        "game": "exact (2^16 coalitions)",
        "players": model.num_players,
        "images": args.images,
        "rows": rows,
        "sampling_error": sum(s for s, _ in sampling) / len(sampling),
        "sampling_errors": [s for s, _ in sampling],
        "kernel_standard_error": sum(se for _, se in sampling) / len(sampling),
        "sampling_reference": f"exact fp32; KernelSHAP seeds 1..{args.seeds}",
    }


def train_digits(args, device: torch.device) -> Path:
    from shapkern.training import train

    out = Path(args.out) / "digits"
    train(out=str(out), device=device.type, seed=args.seed, progress=False, heatmap_images=0, faith_images=0)
    return out / "checkpoint.pt"


def vit_rows(args, device: torch.device) -> dict:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval().to(device)
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.vit_images, 3, 224, 224, generator=gen).to(device)

    def game_at(precision):
        return model_game(model, images, precision=precision)

    reference_game = game_at("auto")
    target = predicted_class(reference_game)
    kernel = {
        "method": "kernel",
        "budget": args.budget,
        "target": target,
        "coalitions_per_call": args.batch_size,
    }
    runs = [run(game_at, "fp32", device, seed=seed, **kernel) for seed in range(args.vit_seeds)]
    reference = runs[0][0]
    rows = {"fp32": {"seconds": runs[0][1], "full_error": 0.0, "phi_error": 0.0}}
    for name in args.vit_precisions:
        att, seconds = run(game_at, name, device, seed=0, **kernel)
        rows[name] = {
            "seconds": seconds,
            "full_error": harness.relative_error(att.full, reference.full),
            "phi_error": harness.relative_error(att.values, reference.values),
        }
    k = len(runs)
    if k > 1:
        pooled = torch.stack([att.values.double() for att, _ in runs]).mean(0)
        errors = [harness.relative_error(att.values, pooled) * math.sqrt(k / (k - 1)) for att, _ in runs]
        sampling = f"pooled fp32 KernelSHAP, seeds 0..{k - 1} ({k} x {args.budget} evaluations)"
    else:  # one run: its own standard error stands for the sampling error
        errors = [standard_error(reference)]
        sampling = (
            f"KernelSHAP's SE of the fp32 seed-0 run: one run per precision on {args.vit_images} image(s), "
            "to bound the CPU time (on digits the SE matches the true sampling error)"
        )
    return {
        "model": "vit_base_patch16_224, random weights",
        "game": f"KernelSHAP, {args.budget} evaluations, seed 0",
        "players": reference_game.players,
        "images": args.vit_images,
        "rows": rows,
        "sampling_error": sum(errors) / k,
        "sampling_errors": errors,
        "kernel_standard_error": standard_error(reference),
        "sampling_reference": sampling,
    }


def markdown(results: dict, env: dict, budget: int) -> str:
    lines = [
        "# fp8 Shapley-value error",
        "",
        f"Hardware: {harness.hardware_name(env)}; torch {env['torch']}, timm {env['timm']}, {env['date']}. "
        f"`{harness.command_line()}`",
        "",
        "Relative L2 error of the Shapley values of the predicted class against fp32 on the same "
        "coalitions, and of v(N) (the full image's logit); KernelSHAP's sampling error at "
        f"{budget:,} evaluations on the same images (see the script's docstring for the references).",
        "",
        "",
    ]
    headers = [
        "model",
        "N",
        "images",
        "game",
        "precision",
        "v(N) error",
        "φ error",
        "KernelSHAP sampling error",
        "KernelSHAP SE",
        "φ error / sampling",
        "seconds",
    ]
    table = []
    for block in results.values():
        for name, row in block["rows"].items():
            if name == "fp32":
                continue
            table.append(
                [
                    block["model"],
                    block["players"],
                    block["images"],
                    block["game"],
                    name,
                    f"{row['full_error']:.2e}",
                    f"{row['phi_error']:.2e}",
                    f"{block['sampling_error']:.2e}",
                    f"{block['kernel_standard_error']:.2e}",
                    f"{row['phi_error'] / block['sampling_error']:.3f}",
                    f"{row['seconds']:.0f}",
                ]
            )
    notes = [f"- {b['model']}: sampling error from {b['sampling_reference']}." for b in results.values()]
    table = harness.markdown_table(headers, table, align="lrrllrrrrrr")
    return "\n".join(lines) + table.rstrip("\n") + "\n\n" + "\n".join(notes) + "\n"


def main() -> None:
    parser = harness.argument_parser(__doc__)
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="digits ShapleyViT checkpoint (default: train one under --out)",
    )
    parser.add_argument("--budget", type=int, default=2048, help="KernelSHAP evaluations per image")
    parser.add_argument("--images", type=int, default=4, help="digits test images (0: skip them)")
    parser.add_argument("--seeds", type=int, default=4, help="KernelSHAP seeds on digits")
    parser.add_argument(
        "--vit-images",
        type=int,
        default=None,
        help="random images for vit_base (default: 8 on CUDA, 0 = skip on the CPU)",
    )
    parser.add_argument(
        "--vit-seeds",
        type=int,
        default=None,
        help="fp32 KernelSHAP seeds on vit_base (default: 4 on CUDA; 1 on the CPU: sampling error = SE)",
    )
    parser.add_argument("--digits-precisions", default="fp8,fp8 + bf16,bf16", help="comma-separated")
    parser.add_argument(
        "--vit-precisions",
        default=None,
        help="comma-separated (default: fp8 on the CPU, fp8,fp8 + bf16,bf16 on CUDA)",
    )
    parser.add_argument("--batch-size", type=int, default=512, help="coalitions per image and engine call")
    parser.add_argument("--seed", type=int, default=0, help="dataset split, digits training, vit_base images")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.vit_images = (8 if cuda else 0) if args.vit_images is None else args.vit_images
    args.vit_seeds = (4 if cuda else 1) if args.vit_seeds is None else args.vit_seeds
    if args.vit_seeds < 1:
        parser.error("--vit-seeds must be at least 1")
    vit_default = "fp8,fp8 + bf16,bf16" if cuda else "fp8"
    args.digits_precisions = [p.strip() for p in args.digits_precisions.split(",") if p.strip()]
    args.vit_precisions = [p.strip() for p in (args.vit_precisions or vit_default).split(",") if p.strip()]
    for name in args.digits_precisions + args.vit_precisions:
        if name not in PRECISIONS or name == "fp32":
            parser.error(f"unknown precision {name!r}; choose from {[p for p in PRECISIONS if p != 'fp32']}")
    harness.configure_cpu_threads()
    out = harness.results_dir(args.out, device)
    args.out = out
    env = harness.environment(device)
    results = {}
    if args.images:
        results["digits"] = digits_rows(args, device)
        harness.write_results(
            out, "fp8_error", {"env": env, "results": results}, markdown(results, env, args.budget)
        )
    if args.vit_images:
        results["vit_base"] = vit_rows(args, device)
    harness.write_results(
        out, "fp8_error", {"env": env, "results": results}, markdown(results, env, args.budget)
    )
    print(markdown(results, env, args.budget))


if __name__ == "__main__":
    main()
