"""One ShapleyViT training step: shapkern against the strongest alternatives, the same loss, one run.

    python -m benchmarks.bench_train_step [--device cuda|cpu] [--images B] [--coalitions M] [--out DIR]

Every method runs the same step: ``shapley_step`` with ShapleyLoss (its defaults: λ = 1, μ = 1, KL
mask loss, ℓ_sv's gradient through its targets, so every coalition carries gradients;
``--stop-grad`` with ``--grad-coalitions`` for the stop-gradient form) on B images × M paired
coalitions, backward, AdamW. They differ in how Φ(x), f(x) and v_x(S) = Σ_{n∈S} Φ(x_S)_n are
computed:

- shapkern: ``ShapleyViT`` itself, one packed engine pass (compiled blocks by default on CUDA).
- pairs + dense mask: complementary coalitions share one row [prefix, prefix, N patches] with a
  block-diagonal mask (as benchmarks/baselines.py ``pairs_dense_mask`` does for logits); the
  per-token head outputs are summed over each coalition's patches. Eager SDPA, and on CUDA the
  whole model under torch.compile (the strongest alternative).
- zero-input masking: Φ(x) from timm's forward, v_x(S) from a forward of each pixel-masked image
  (a different game: absent patches are zeros, not dropped).

The steps are timed round-robin (benchmarks/harness.py). Before timing, the loss and the
parameter gradients of every token-dropping method are compared, on the same weights, with an fp32
reference (eager dense pairs) and with shapkern's. Reports steps/s, images/s, the ratio to the
best alternative and peak GPU memory; writes train_step.{json,md}. CUDA: vit_base_patch16_224 at
224 px, bf16 autocast, 32 × 32. CPU: the digits model of ``shapkern train`` (TrainConfig), 64 × 8.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

import shapkern
from benchmarks import harness
from benchmarks.baselines_train import PairsShapleyViT, ZeroInputShapleyViT
from shapkern.training import shapley_step

LOSS = {"lam": 1.0, "mu": 1.0, "mask_loss": "kl"}
TOLERANCE = {"bf16": 2e-2, "fp32": 1e-4}  # least relative difference allowed between two methods


def build(args):
    """device, the ShapleyViT, images (B, C, H, W), labels (B,), coalitions (B, M, N), config."""
    device = torch.device(args.device)
    if device.type == "cuda":  # ViT-B/16 at 224 px, ViT-Shapley's M = 32
        name, img, kwargs = "vit_base_patch16_224", 224, {}
        batch, num = args.images or 32, args.coalitions or 32
    else:  # the digits model of `shapkern train`
        cfg = shapkern.TrainConfig()
        name, kwargs = cfg.model, cfg.arch()
        img = kwargs.pop("img_size")
        batch, num = args.images or cfg.batch_size, args.coalitions or cfg.num_coalitions
    torch.manual_seed(0)
    model = shapkern.ShapleyViT(name, 10, img_size=img, **kwargs).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(batch, 3, img, img, device=device, generator=gen)
    labels = torch.randint(0, 10, (batch,), device=device, generator=gen)
    coalitions = shapkern.sample_coalitions(batch, num, model.num_players, generator=gen)
    config = {"model": name, "img_size": img, "backbone_kwargs": kwargs, "images": batch, "coalitions": num}
    return device, model, images, labels, coalitions, config


def methods(model: shapkern.ShapleyViT, device: torch.device) -> dict[str, tuple[nn.Module, bool]]:
    """name -> (module run by shapley_step, whether it computes the token-dropping game)."""
    table = {
        "shapkern ShapleyViT": (model, True),
        "pairs + dense mask, SDPA": (PairsShapleyViT(model), True),
    }
    if device.type == "cuda":
        table["pairs + dense mask, torch.compile"] = (PairsShapleyViT(model, compile=True), True)
    table["zero-input masking, timm forward"] = (ZeroInputShapleyViT(model), False)
    return table


def loss_and_grads(model, module, loss_fn, images, labels, coalitions, autocast: bool):
    """The loss (float) through ``module`` and the gradient of every parameter of ``model`` (the
    ShapleyViT that ``module`` runs), flat in float64, without an optimiser step."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = shapley_step(module, loss_fn, images, labels, coalitions).total
    loss.backward()
    grads = torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def _errors(got: tuple[float, torch.Tensor], want: tuple[float, torch.Tensor], label: str) -> dict:
    """Relative errors of a (loss, flat gradients) pair against another, keyed by ``label``."""
    return {
        f"loss_error_{label}": abs(got[0] - want[0]) / max(abs(want[0]), 1e-30),
        f"gradient_error_{label}": harness.relative_error(got[1], want[1]),
    }


def step(module, loss_fn, optimizer, images, labels, coalitions, autocast: bool) -> None:
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = shapley_step(module, loss_fn, images, labels, coalitions).total
    loss.backward()
    optimizer.step()


def _loss(args, coalitions: int) -> tuple[shapkern.ShapleyLoss, dict]:
    """The ShapleyLoss every method runs, and its settings for the result."""
    loss_fn = shapkern.ShapleyLoss(**LOSS, stop_grad=args.stop_grad, grad_coalitions=args.grad_coalitions)
    loss_config = {key: getattr(loss_fn, key) for key in ("lam", "mu", "mask_loss", "sv_scale", "stop_grad")}
    loss_config.update(num_coalitions=coalitions, grad_coalitions=loss_fn.graded(coalitions))
    return loss_fn, loss_config


def _check(rows: dict, table: dict, model, loss_fn, batch: tuple, cuda: bool) -> float:
    """Each token-dropping method's loss and gradient errors into its row, on the same weights for
    every method (the timed steps change them): against an fp32 reference (eager dense pairs:
    timm's own modules), and against shapkern. Returns the tolerance of a match with shapkern."""
    reference = loss_and_grads(model, PairsShapleyViT(model), loss_fn, *batch, False)
    shapkern_result, tolerance = None, TOLERANCE["bf16" if cuda else "fp32"]
    for name, (module, same_game) in table.items():
        row = rows[name]
        if not same_game:
            row["game"] = "zero input (a different value function: not compared)"
            continue
        try:
            loss, grads = loss_and_grads(model, module, loss_fn, *batch, cuda)
        except Exception as error:  # noqa: BLE001 - one failing method must not hide the others
            row["failed"] = harness.failure(error)
            print(f"{name:<36} failed: {error!r}", flush=True)
            continue
        row.update(loss=loss, **_errors((loss, grads), reference, "fp32"))
        if row["shapkern"]:  # the first row
            shapkern_result = loss, grads
            # Two computations in one dtype may differ by the sum of their own rounding errors.
            tolerance = max(tolerance, 2 * row["loss_error_fp32"], 2 * row["gradient_error_fp32"])
        if shapkern_result is not None:
            row.update(_errors((loss, grads), shapkern_result, "shapkern"))
            worst = max(row["loss_error_shapkern"], row["gradient_error_shapkern"])
            row["matches_shapkern"] = worst <= tolerance
        print(
            f"{name:<36} loss {loss:.6f}; error vs fp32 {row['loss_error_fp32']:.1e} (loss) "
            f"{row['gradient_error_fp32']:.1e} (gradients)",
            flush=True,
        )
    return tolerance


def _time(args, rows: dict, table: dict, model, loss_fn, batch: tuple, images: int) -> dict | None:
    """Time the steps of the methods that did not fail round-robin into their rows; returns the
    fastest alternative's row."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fns = {
        name: partial(step, module, loss_fn, optimizer, *batch, cuda)
        for name, (module, _) in table.items()
        if "failed" not in rows[name]
    }
    timings = harness.time_interleaved(fns, device, warmup=args.warmup, repeats=args.repeats, catch=True)
    for name, stats in timings.items():
        if "failed" in stats:
            rows[name]["failed"] = stats["failed"]
            continue
        stats["steps_per_s"] = 1e3 / stats["median_ms"]
        stats["images_per_s"] = images * stats["steps_per_s"]
        rows[name].update(stats)
        print(f"{name:<36} {stats['images_per_s']:10.1f} images/s", flush=True)
    timed = [row for row in rows.values() if "images_per_s" in row]
    best = max(
        (row for row in timed if not row["shapkern"]), key=lambda row: row["images_per_s"], default=None
    )
    for row in timed:
        if best is not None:
            row["vs_best_alternative"] = row["images_per_s"] / best["images_per_s"]
    return best


def measure(args) -> dict:
    device, model, images, labels, coalitions, config = build(args)
    cuda = device.type == "cuda"
    loss_fn, loss_config = _loss(args, config["coalitions"])
    table = methods(model, device)
    rows = {name: {"method": name, "shapkern": module is model} for name, (module, _) in table.items()}
    batch = (images, labels, coalitions)
    tolerance = _check(rows, table, model, loss_fn, batch, cuda)
    best = _time(args, rows, table, model, loss_fn, batch, config["images"])
    return {
        "environment": harness.environment(device),
        "command": harness.command_line(),
        "config": {
            **config,
            "loss": loss_config,
            "autocast_bf16": cuda,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "timing": "interleaved",
            "tolerance": tolerance,
        },
        "best_alternative": best["method"] if best else None,
        "rows": list(rows.values()),
    }


def _graded(config: dict) -> str:
    graded = config["loss"].get("grad_coalitions", config["coalitions"])
    return (
        ""
        if graded == config["coalitions"]
        else f", gradients through {graded} of the {config['coalitions']}"
    )


def _cells(row: dict) -> list:
    """One method's cells: steps/s, images/s, × best alternative, peak MiB, errors."""
    if "images_per_s" not in row:
        return [row["method"], f"failed: {row.get('failed')}"]
    ratio = row.get("vs_best_alternative")
    fp32 = (
        f"{row['loss_error_fp32']:.1e} / {row['gradient_error_fp32']:.1e}"
        if "loss_error_fp32" in row
        else "—"
    )
    versus = "—"
    if "matches_shapkern" in row:
        versus = f"{row['loss_error_shapkern']:.1e} / {row['gradient_error_shapkern']:.1e}"
        versus += "" if row["matches_shapkern"] else " (MISMATCH)"
    return [
        row["method"],
        f"{row['steps_per_s']:.2f}",
        f"{row['images_per_s']:,.1f} ({row['min_ms']:,.0f}–{row['max_ms']:,.0f} ms)",
        "—" if ratio is None else f"×{ratio:.2f}",
        "—" if row["peak_mib"] is None else f"{row['peak_mib']:,.0f}",
        fp32,
        versus,
    ]


def markdown(result: dict) -> str:
    env, config = result["environment"], result["config"]
    table = [_cells(row) for row in result["rows"]]
    kwargs = ", ".join(f"{k}={v}" for k, v in config["backbone_kwargs"].items())
    lines = [
        f"# ShapleyViT training step on {harness.hardware_name(env)}",
        "",
        (
            f"{config['model']}{f' ({kwargs})' if kwargs else ''} at {config['img_size']} px, "
            f"{config['images']} images × {config['coalitions']} paired coalitions, ShapleyLoss λ = "
            f"{config['loss']['lam']:g}, μ = {config['loss']['mu']:g} ({config['loss']['mask_loss']})"
            f"{_graded(config)}, AdamW"
            f"{', bf16 autocast' if config['autocast_bf16'] else ', fp32'}; torch {env['torch']}, triton "
            f"{env['triton']}, timm {env['timm']}, {env['date']}. Command: `{result['command']}`"
        ),
        "",
        (
            f"Median of {config['repeats']} steps per method, the methods timed round-robin (min–max time "
            f"per step in brackets). × best alt.: over the fastest method outside shapkern "
            f"({result['best_alternative']}). Errors (loss / parameter gradients, relative, before any "
            "optimiser step): against an fp32 run of eager dense pairs (timm's own modules), and against "
            f"shapkern's step (match: ≤ {config['tolerance']:.1e}, twice shapkern's own error against fp32 "
            "or more); zero-input masking computes a different game."
        ),
        "",
        harness.markdown_table(
            [
                "method",
                "steps/s",
                "images/s (min–max time)",
                "× best alt.",
                "peak MiB",
                "error vs fp32",
                "vs shapkern",
            ],
            table,
        ),
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = harness.argument_parser(__doc__)
    parser.add_argument("--images", type=int, help="B (default: 32 on CUDA, 64 on the CPU)")
    parser.add_argument(
        "--coalitions", type=int, help="M, paired, per image (default: 32 on CUDA, 8 on the CPU)"
    )
    parser.add_argument(
        "--grad-coalitions", type=int, help="coalitions carrying gradients (default: ShapleyLoss's)"
    )
    parser.add_argument(
        "--stop-grad", action="store_true", help="no gradient through ℓ_sv's targets (then G < M works)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method")
    args = parser.parse_args(argv)
    if args.coalitions is not None and (args.coalitions < 2 or args.coalitions % 2):
        parser.error(f"--coalitions must be even and >= 2 (paired coalitions), got {args.coalitions}")
    harness.configure_cpu_threads()
    out = harness.results_dir(args.out, args.device)
    result = measure(args)
    harness.write_results(out, "train_step", result, markdown(result))
    print(markdown(result))
    print(f"wrote {out}/train_step.{{json,md}}")
    return result


if __name__ == "__main__":
    main()
