"""Coalition throughput: shapkern against today's alternatives, measured in one run.

    python benchmarks/run.py [--device cuda|cpu] [--model vit_base_patch16_224] [--images 32]
                             [--coalitions 32] [--dtype bf16|fp16|fp32] [--out DIR]

Reports evaluations per second (one evaluation = one image under one coalition), forward and
forward+backward, with the ratio to the zero-input baseline and to the FLOP floor (design.md §5:
packed FLOPs over a GEMM rate measured in the same run), peak memory, and a correctness check
of every method against an fp32 reference on the same coalitions. Writes JSON, Markdown and a
PNG bar chart under benchmarks/results/<date>-<device>/.
"""

from __future__ import annotations

import argparse
import copy
from functools import partial
from pathlib import Path

import common
import timm
import torch

import shapkern

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOLERANCE = {"bf16": 1e-2, "fp16": 1e-2, "fp32": 1e-4}
CHECK_IMAGES, GRADIENT_CHECK_IMAGES = 8, 2
RATIO_BASELINES = {"vs_zero_input": "zero-input full forward", "vs_varlen_attn": "packed, torch varlen_attn"}


def parse_args(argv=None, **defaults):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default=common.default_device(), choices=["cuda", "cpu"])
    parser.add_argument("--model", default=None, help="timm model name (random weights, no download)")
    parser.add_argument("--img-size", type=int, default=None, help="image size (default: the model's)")
    parser.add_argument("--patch-size", type=int, default=None, help="patch size (default: the model's)")
    parser.add_argument("--images", type=int, default=None, help="images per batch")
    parser.add_argument("--coalitions", type=int, default=32, help="paired coalitions per image")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES))
    parser.add_argument("--methods", nargs="*", default=None, help="subset of methods to run")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-backward", action="store_true", help="forward only")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--stem", default=None, help="output file name without extension")
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.model = args.model or ("vit_base_patch16_224" if cuda else "vit_tiny_patch16_224")
    args.images = args.images or (32 if cuda else 2)
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.repeats = args.repeats or (10 if cuda else 3)
    if args.coalitions < 2 or args.coalitions % 2:
        parser.error(f"--coalitions must be even and >= 2 (paired coalitions), got {args.coalitions}")
    unknown = set(args.methods or ()) - set(common.METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {list(common.METHODS)}")
    return args


def build(args):
    device = torch.device(args.device)
    kwargs = {key: getattr(args, key) for key in ("img_size", "patch_size") if getattr(args, key)}
    reference_model = timm.create_model(args.model, pretrained=False, **kwargs).eval().to(device)
    if reference_model.global_pool != "token":
        raise SystemExit(
            f"benchmarks need a class-token ViT; {args.model} pools with {reference_model.global_pool!r}"
        )
    model = copy.deepcopy(reference_model).to(DTYPES[args.dtype])
    size = reference_model.patch_embed.img_size
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(args.images, 3, *size, device=device, generator=gen)
    players = shapkern.engine.num_players(model)
    coalitions = shapkern.sample_coalitions(args.images, args.coalitions, players, generator=gen)
    return device, reference_model, model, images, coalitions


def _forward_backward(fn, model, images, coalitions):
    fn(model, images, coalitions).float().sum().backward()


def _gradients(fn, model, images, coalitions, weights) -> torch.Tensor:
    """Gradient of sum(weights * output) for every parameter and the images, flat in float64.

    weights (B', M, K) covers the first B' images; the rest get zero weight, so a method runs on
    the whole batch (the shapes it was timed at) while the oracle needs only those B' images.
    """
    model.zero_grad(set_to_none=True)
    images = images.detach().clone().requires_grad_()
    out = fn(model, images, coalitions)
    (out[: weights.shape[0]].float() * weights).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None] + [images.grad[: weights.shape[0]]]
    flat = torch.cat([g.double().flatten() for g in grads])
    model.zero_grad(set_to_none=True)
    return flat


def _measure_method(row, fn, model, images, coalitions, args, check, want) -> None:
    """Correctness on the checked images, then forward and forward+backward times, into row."""
    with torch.no_grad():
        row["relative_error"] = common.relative_error(fn(model, images, coalitions)[check], want)
        row["forward"] = common.time_fn(
            partial(fn, model, images, coalitions), images.device, repeats=args.repeats
        )
    if not args.no_backward:
        step = partial(_forward_backward, fn, model, images.clone().requires_grad_(), coalitions)
        row["forward+backward"] = common.time_fn(step, images.device, repeats=args.repeats)
        model.zero_grad(set_to_none=True)


def measure(args, on_row=None) -> dict:
    """Every selected method's speed and correctness; on_row(result so far) runs after each method."""
    device, reference_model, model, images, coalitions = build(args)
    low = images.to(DTYPES[args.dtype])
    evaluations = coalitions.shape[0] * coalitions.shape[1]
    flops = common.packed_flops(model, coalitions)
    gemm_dtype = DTYPES["bf16"] if device.type == "cuda" else torch.float32
    gemm = common.gemm_tflops(device, gemm_dtype, size=8192 if device.type == "cuda" else 1024, repeats=5)
    floor = {
        "forward": gemm * 1e12 / flops * evaluations,
        "forward+backward": gemm * 1e12 / (3 * flops) * evaluations,
    }
    # fp32 oracles on the first images only (each row is independent), so that they stay cheap.
    check, grad_check = slice(0, CHECK_IMAGES), slice(0, GRADIENT_CHECK_IMAGES)
    oracle_fns = {"token dropping": common.key_mask, "zero input": common.zero_input}
    with torch.no_grad():
        oracle = {
            game: fn(reference_model, images[check], coalitions[check]) for game, fn in oracle_fns.items()
        }
    if not args.no_backward:
        # Random output weights, so that the check sees every logit's gradient, not only their sum.
        gen = torch.Generator(device=device).manual_seed(1)
        weights = torch.randn(oracle["token dropping"][grad_check].shape, device=device, generator=gen)
        oracle_grads = {
            game: _gradients(fn, reference_model, images[grad_check], coalitions[grad_check], weights)
            for game, fn in oracle_fns.items()
        }
    rows = []
    result = {
        "environment": common.environment(device),
        "config": {
            "model": args.model,
            "images": coalitions.shape[0],
            "coalitions": coalitions.shape[1],
            "players": coalitions.shape[2],
            "dtype": args.dtype,
            "paired": True,
            "repeats": args.repeats,
            "mean_kept_fraction": float(coalitions.float().mean()),
        },
        "gemm_tflops": gemm,
        "packed_gflops_forward": flops / 1e9,
        "floor_evals_per_s": floor,
        "tolerance": TOLERANCE[args.dtype],
        "methods": rows,
    }
    for name, fn in common.METHODS.items():
        if args.methods and name not in args.methods:
            continue
        row = {"method": name, "doc": fn.__doc__}
        reason = common.unavailable_reason(name, device)
        if reason:
            row["unavailable"] = reason
            print(f"{name:<36} unavailable: {reason}", flush=True)
        else:
            try:
                game = "zero input" if fn is common.zero_input else "token dropping"
                _measure_method(row, fn, model, low, coalitions, args, check, oracle[game])
                if not args.no_backward:
                    grads = _gradients(fn, model, low, coalitions, weights)
                    row["gradient_relative_error"] = common.relative_error(grads, oracle_grads[game])
            except Exception as error:  # noqa: BLE001 - one failing method must not hide the others
                row["failed"] = "out of memory" if isinstance(error, torch.OutOfMemoryError) else repr(error)
            if "failed" in row:  # after the except clause, which holds the failed step's tensors
                model.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                print(f"{name:<36} failed: {row['failed']}", flush=True)
        if "relative_error" in row:
            errors = [row[key] for key in ("relative_error", "gradient_relative_error") if key in row]
            row["correct"] = max(errors) <= TOLERANCE[args.dtype]
            for phase in ("forward", "forward+backward"):
                if phase in row:
                    row[phase]["evals_per_s"] = evaluations / (row[phase]["median_ms"] * 1e-3)
                    row[phase]["fraction_of_floor"] = row[phase]["evals_per_s"] / floor[phase]
            if "forward" in row:
                print(
                    f"{name:<36} {row['forward']['evals_per_s']:>12,.0f} evals/s fwd  err {row['relative_error']:.1e}",
                    flush=True,
                )
        rows.append(row)
        _add_ratios(rows)
        if on_row:
            on_row(result)
    return result


def _add_ratios(rows: list[dict]) -> None:
    for key, method in RATIO_BASELINES.items():
        baseline = next((r for r in rows if r["method"] == method), {})
        for row in rows:
            for phase in ("forward", "forward+backward"):
                if phase in row and phase in baseline and "evals_per_s" in baseline[phase]:
                    row[phase][key] = row[phase]["evals_per_s"] / baseline[phase]["evals_per_s"]


def _not_measured(row: dict) -> str | None:
    if "unavailable" in row:
        return f"unavailable: {row['unavailable']}"
    if "failed" in row:
        return f"failed: {row['failed']}"
    return None


def _cell(row: dict, phase: str) -> str:
    stats = row.get(phase)
    if stats is None:
        return _not_measured(row) or "—"
    spread = f"{stats['min_ms']:.1f}–{stats['max_ms']:.1f} ms"
    ratio = "".join(
        f", ×{stats[key]:.2f} {label}"
        for key, label in (("vs_zero_input", "zero-input"), ("vs_varlen_attn", "varlen_attn"))
        if key in stats
    )
    return f"{stats['evals_per_s']:,.0f} ({spread}{ratio}, {stats['fraction_of_floor']:.0%} of floor)"


def _error(value: float | None) -> str:
    return "—" if value is None else f"{value:.1e}"


def _error_note(result: dict) -> str:
    """What the error columns compare, and the error of timm's own forward in the same dtype."""
    note = (
        f"Errors: relative to an fp32 run of timm's own forward on the first {CHECK_IMAGES} images (logits) "
        f"and {GRADIENT_CHECK_IMAGES} images (gradients of parameters and images); correct = both ≤ "
        f"{result['tolerance']:g}."
    )
    timm_row = next(
        (r for r in result["methods"] if r["method"] == "key mask, SDPA" and "relative_error" in r), None
    )
    if timm_row and result["config"]["dtype"] != "fp32":
        note += (
            f" timm's own key-masked forward in {result['config']['dtype']} (same game, no shapkern code) errs by "
            f"{timm_row['relative_error']:.1e} (logits) and {_error(timm_row.get('gradient_relative_error'))} "
            "(gradients): the rounding of the dtype itself."
        )
    return note


def markdown(result: dict, command: str) -> str:
    env, config = result["environment"], result["config"]
    lines = [
        f"# Coalition throughput on {common.hardware_name(env)}",
        "",
        (
            f"{config['model']}, {config['dtype']}, {config['images']} images × {config['coalitions']} paired "
            f"coalitions ({config['players']} players); torch {env['torch']}, triton {env['triton']}, "
            f"timm {env['timm']}, {env['date']}. Command: `{command}`"
        ),
        "",
        (
            "Evaluations per second, median (min–max time, ratios to zero-input and to varlen_attn, "
            "fraction of the floor). "
            f"Floor: packed FLOPs at the measured GEMM rate of {result['gemm_tflops']:.1f} TFLOP/s = "
            f"{result['floor_evals_per_s']['forward']:,.0f} evals/s forward."
        ),
        "",
        _error_note(result),
        "",
        "| method | forward | forward+backward | peak MiB | rel. error | grad. rel. error | correct |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["methods"]:
        if "forward" not in row:
            lines.append(f"| {row['method']} | {_not_measured(row)} | | | | | |")
            continue
        peak = row["forward"]["peak_mib"]
        lines.append(
            f"| {row['method']} | {_cell(row, 'forward')} | {_cell(row, 'forward+backward')} | "
            f"{'—' if peak is None else f'{peak:,.0f}'} | "
            f"{row['relative_error']:.1e} | {_error(row.get('gradient_relative_error'))} | "
            f"{'yes' if row.get('correct') else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def bar_chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["methods"] if "forward" in r]
    phases = [p for p in ("forward", "forward+backward") if any(p in r for r in rows)]
    fig, ax = plt.subplots(figsize=(9, 0.5 + 0.6 * len(rows)))
    height = 0.8 / len(phases)
    for i, phase in enumerate(phases):
        values = [r.get(phase, {}).get("evals_per_s", 0) for r in rows]
        ax.barh([j + i * height for j in range(len(rows))], values, height, label=phase)
    for i, phase in enumerate(phases):
        ax.axvline(result["floor_evals_per_s"][phase], color=f"C{i}", linestyle="--", linewidth=1)
    ax.set_yticks([j + height * (len(phases) - 1) / 2 for j in range(len(rows))], [r["method"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("evaluations / s (dashed: FLOP floor)")
    ax.set_title(f"{result['config']['model']} on {common.hardware_name(result['environment'])}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None, stem: str = "throughput", **defaults) -> dict:
    args = parse_args(argv, **defaults)
    common.configure_cpu_threads()
    stem = args.stem or stem
    out = common.results_dir(args.out, args.device)
    command = "python benchmarks/run.py " + " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if k in ("device", "model", "images", "coalitions", "dtype")
    )

    def write(result: dict) -> None:  # after every method, so that a run cut short keeps its rows
        common.write_results(out, stem, result, markdown(result, command))

    result = measure(args, on_row=write)
    bar_chart(result, out / f"{stem}.png")
    print(markdown(result, command))
    print(f"wrote {out}/{stem}.{{json,md,png}}")
    return result


if __name__ == "__main__":
    main()
