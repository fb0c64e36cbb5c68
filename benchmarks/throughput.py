"""Coalition throughput: shapkern against every alternative (benchmarks/baselines.py) in one run.

    python benchmarks/throughput.py [--device cuda|cpu] [--model vit_base_patch16_224] [--images 32]
                                    [--coalitions 32] [--dtype bf16|fp16|fp32] [--out DIR]

Reports evaluations per second (one evaluation = one image under one coalition), forward and
forward+backward, with the ratio to the best alternative (fastest method outside shapkern) and to
the FLOP floor (packed FLOPs over a GEMM rate measured in the same run), peak GPU memory, and the
error of every method against an fp32 reference on the same coalitions, logits and gradients.
Methods are timed round-robin (benchmarks/harness.py): one slow moment of the machine lands on
all methods of that round, not on one row. Writes throughput.{json,md,png}.

Sizes not given follow the device: on CUDA vit_base_patch16_224, bf16, 32 images, 10 repeats; on
the CPU vit_tiny_patch16_224, fp32, 2 images, 5 repeats.
"""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import baselines
import harness
import timm
import torch

import shapkern

TOLERANCE = {"bf16": 1e-2, "fp16": 1e-2, "fp32": 1e-4}
CHECK_IMAGES, GRADIENT_CHECK_IMAGES = 8, 2
PHASES = ("forward", "forward+backward")
RATIO_BASELINES = {"vs_zero_input": "zero-input full forward", "vs_varlen_attn": "packed, torch varlen_attn"}
DEFAULTS = {  # per device, for the options the command line leaves open
    "cuda": {
        "model": "vit_base_patch16_224",
        "images": 32,
        "dtype": "bf16",
        "repeats": 10,
        "warmup": 2,
        "no_backward": False,
    },
    "cpu": {
        "model": "vit_tiny_patch16_224",
        "images": 2,
        "dtype": "fp32",
        "repeats": 5,
        "warmup": 1,
        "no_backward": False,
    },
}


def parse_args(argv=None, *, description=__doc__, stem="throughput", device_defaults=None):
    """The command line of this benchmark, also used by bench_engine, bench_scaling and profile_engine.

    Args:
        argv: arguments (default: sys.argv[1:]).
        description: the ``--help`` text.
        stem: the default output file name.
        device_defaults: {"cpu" | "cuda": {option: value}} over :data:`DEFAULTS`, for the options
            the command line leaves open (``methods`` included).
    """
    parser = harness.argument_parser(description)
    parser.add_argument("--model", help="timm model name, random weights (default: per device, see above)")
    parser.add_argument("--img-size", type=int, help="image size (default: the model's)")
    parser.add_argument("--patch-size", type=int, help="patch size (default: the model's)")
    parser.add_argument("--images", type=int, help="images per batch (default: per device)")
    parser.add_argument("--coalitions", type=int, default=32, help="paired coalitions per image")
    parser.add_argument("--dtype", choices=list(harness.DTYPES), help="model dtype (default: per device)")
    parser.add_argument("--methods", nargs="*", help="subset of methods to run (default: all)")
    parser.add_argument("--repeats", type=int, help="timed rounds (default: per device)")
    parser.add_argument("--warmup", type=int, help="untimed calls per method (default: per device)")
    parser.add_argument("--no-backward", action="store_true", default=None, help="forward only")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=harness.CLOCKS,
        help="'process': CPU time of this process, for a shared CPU machine (with OMP_NUM_THREADS=1)",
    )
    parser.add_argument("--stem", default=stem, help="output file name without extension")
    args = parser.parse_args(argv)
    defaults = {**DEFAULTS[args.device], **(device_defaults or {}).get(args.device, {})}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.coalitions < 2 or args.coalitions % 2:
        parser.error(f"--coalitions must be even and >= 2 (paired coalitions), got {args.coalitions}")
    unknown = set(args.methods or ()) - set(baselines.METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {list(baselines.METHODS)}")
    return args


def build(args):
    """device, the fp32 reference model, the model in --dtype, images (B, C, H, W), coalitions (B, M, N)."""
    device = torch.device(args.device)
    kwargs = {key: getattr(args, key) for key in ("img_size", "patch_size") if getattr(args, key)}
    reference_model = timm.create_model(args.model, pretrained=False, **kwargs).eval().to(device)
    if reference_model.global_pool != "token":
        raise SystemExit(
            f"benchmarks need a class-token ViT; {args.model} pools with {reference_model.global_pool!r}"
        )
    model = copy.deepcopy(reference_model).to(harness.DTYPES[args.dtype])
    size = reference_model.patch_embed.img_size
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(args.images, 3, *size, device=device, generator=gen)
    players = shapkern.engine.num_players(model)
    coalitions = shapkern.sample_coalitions(args.images, args.coalitions, players, generator=gen)
    return device, reference_model, model, images, coalitions


def forward(fn, model, images, coalitions):
    """One evaluation pass without autograd."""
    with torch.no_grad():
        return fn(model, images, coalitions)


def forward_backward(fn, model, images, coalitions):
    """One evaluation pass and the backward of the summed outputs into fresh gradients."""
    model.zero_grad(set_to_none=True)
    images.grad = None
    fn(model, images, coalitions).float().sum().backward()


def _gradients(fn, model, images, coalitions, weights) -> torch.Tensor:
    """Gradient of sum(weights * output) for every parameter and the images, flat in float64.

    weights (B', M, K) covers the first B' images; the rest get zero weight, so a method runs on
    the whole batch (the shapes it is timed at) while the oracle needs only those B' images.
    """
    model.zero_grad(set_to_none=True)
    images = images.detach().clone().requires_grad_()
    out = fn(model, images, coalitions)
    (out[: weights.shape[0]].float() * weights).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None] + [images.grad[: weights.shape[0]]]
    flat = torch.cat([g.double().flatten() for g in grads])
    model.zero_grad(set_to_none=True)
    return flat


def _check(row, method, model, images, coalitions, oracle, backward) -> None:
    """Errors of one method against the fp32 oracles, into row; also its first (compiling) call."""
    check = slice(0, CHECK_IMAGES)
    row["relative_error"] = harness.relative_error(
        forward(method.fn, model, images, coalitions)[check], oracle["values"][method.game]
    )
    if backward and not method.forward_only:
        grads = _gradients(method.fn, model, images, coalitions, oracle["weights"])
        row["gradient_relative_error"] = harness.relative_error(grads, oracle["gradients"][method.game])
    errors = [row[key] for key in ("relative_error", "gradient_relative_error") if key in row]
    row["correct"] = max(errors) <= row["tolerance"]


def _oracles(reference_model, images, coalitions, backward: bool) -> dict:
    """fp32 logits (and gradients) of both games on the first images only, so that they stay cheap."""
    check, grad_check = slice(0, CHECK_IMAGES), slice(0, GRADIENT_CHECK_IMAGES)
    games = {"token dropping": baselines.key_mask, "zero input": baselines.zero_input}
    with torch.no_grad():
        values = {game: fn(reference_model, images[check], coalitions[check]) for game, fn in games.items()}
    oracle = {"values": values}
    if backward:
        # Random output weights, so that the check sees every logit's gradient, not only their sum.
        gen = torch.Generator(device=images.device).manual_seed(1)
        weights = torch.randn(values["token dropping"][grad_check].shape, device=images.device, generator=gen)
        oracle["weights"] = weights
        oracle["gradients"] = {
            game: _gradients(fn, reference_model, images[grad_check], coalitions[grad_check], weights)
            for game, fn in games.items()
        }
    return oracle


def measure(args, on_update=None) -> dict:
    """Every selected method's correctness, then its speed, timed round-robin with the others.

    on_update(result so far) runs after each method's check and after each timed phase, so that
    a run cut short keeps what it measured.
    """
    device, reference_model, model, images, coalitions = build(args)
    low = images.to(harness.DTYPES[args.dtype])
    evaluations = coalitions.shape[0] * coalitions.shape[1]
    flops = baselines.packed_flops(model, coalitions)
    gemm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = 8192 if device.type == "cuda" else 1024
    gemm = harness.gemm_tflops(device, gemm_dtype, size=size, repeats=5, clock=args.clock)
    floor = {"forward": gemm * 1e12 / flops * evaluations}
    floor["forward+backward"] = floor["forward"] / 3
    backward = not args.no_backward
    oracle = _oracles(reference_model, images, coalitions, backward)
    rows = []
    result = {
        "environment": harness.environment(device),
        "command": harness.command_line(),
        "config": {
            "model": args.model,
            "images": coalitions.shape[0],
            "coalitions": coalitions.shape[1],
            "players": coalitions.shape[2],
            "dtype": args.dtype,
            "paired": True,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "timing": "interleaved",
            "clock": args.clock,
            "mean_kept_fraction": float(coalitions.float().mean()),
        },
        "gemm_tflops": gemm,
        "packed_gflops_forward": flops / 1e9,
        "floor_evals_per_s": floor,
        "tolerance": TOLERANCE[args.dtype],
        "methods": rows,
    }
    ready = {}
    for name, method in baselines.METHODS.items():
        if args.methods and name not in args.methods:
            continue
        row = {
            "method": name,
            "doc": method.doc,
            "shapkern": method.shapkern,
            "forward_only": method.forward_only,
            "tolerance": method.tolerance or TOLERANCE[args.dtype],
        }
        rows.append(row)
        reason = baselines.unavailable_reason(name, device)
        if reason:
            row["unavailable"] = reason
            print(f"{name:<36} unavailable: {reason}", flush=True)
            continue
        try:
            _check(row, method, model, low, coalitions, oracle, backward)
            ready[name] = method
            print(f"{name:<36} error {row['relative_error']:.1e}, correct: {row['correct']}", flush=True)
        except Exception as error:  # noqa: BLE001 - one failing method must not hide the others
            row["failed"] = harness.failure(error)
        if "failed" in row:  # after the except clause, which holds the failed call's tensors
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"{name:<36} failed: {row['failed']}", flush=True)
        if on_update:
            on_update(result)
    steps = {"forward": forward, "forward+backward": forward_backward}
    for phase in PHASES if backward else PHASES[:1]:
        inputs = low.clone().requires_grad_() if phase == "forward+backward" else low
        fns = {
            name: partial(steps[phase], method.fn, model, inputs, coalitions)
            for name, method in ready.items()
            if phase == "forward" or not method.forward_only
        }
        timings = harness.time_interleaved(
            fns, device, warmup=args.warmup, repeats=args.repeats, catch=True, clock=args.clock
        )
        model.zero_grad(set_to_none=True)
        for row in rows:
            stats = timings.get(row["method"])
            if stats is None:
                continue
            if "failed" in stats:
                row["failed"] = f"{phase}: {stats['failed']}"
                ready.pop(row["method"])
                continue
            stats["evals_per_s"] = evaluations / (stats["median_ms"] * 1e-3)
            stats["fraction_of_floor"] = stats["evals_per_s"] / floor[phase]
            row[phase] = stats
        _add_ratios(rows, phase)
        for row in rows:
            if phase in row:
                print(f"{row['method']:<36} {row[phase]['evals_per_s']:>12,.1f} evals/s {phase}", flush=True)
        if on_update:
            on_update(result)
    return result


def _add_ratios(rows: list[dict], phase: str) -> None:
    """Each row's speed over the zero-input and varlen_attn rows and over the best alternative."""
    measured = [row for row in rows if phase in row]
    references = {
        key: next((r for r in measured if r["method"] == m), None) for key, m in RATIO_BASELINES.items()
    }
    alternatives = [row for row in measured if not row["shapkern"] and row.get("correct")]
    best = max(alternatives, key=lambda row: row[phase]["evals_per_s"], default=None)
    for row in measured:
        stats = row[phase]
        for key, reference in references.items():
            if reference is not None:
                stats[key] = stats["evals_per_s"] / reference[phase]["evals_per_s"]
        if best is not None:
            stats["best_alternative"] = best["method"]
            stats["vs_best_alternative"] = stats["evals_per_s"] / best[phase]["evals_per_s"]


def _rate(value: float) -> str:
    """Evaluations per second: whole numbers from 100 on, three significant digits below."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _clock_note(config: dict, env: dict) -> str:
    if config.get("clock", "wall") == "wall":
        return ""
    return f"; time = CPU time of the process on {harness.hardware_name(env)}, not wall time"


def _error(value: float | None) -> str:
    return "—" if value is None else f"{value:.1e}"


def _error_note(result: dict) -> str:
    """What the error columns compare, and the error of timm's own forward in the same dtype."""
    note = (
        f"Errors: relative to an fp32 run of timm's own forward on the first {CHECK_IMAGES} images (logits) "
        f"and {GRADIENT_CHECK_IMAGES} images (gradients of parameters and images); correct = both ≤ "
        f"{result['tolerance']:g}"
    )
    looser = {r["method"]: r["tolerance"] for r in result["methods"] if r["tolerance"] != result["tolerance"]}
    note += "".join(f", {tol:g} for {name}" for name, tol in looser.items()) + "."
    timm_row = next(
        (r for r in result["methods"] if r["method"] == "key mask, SDPA" and "relative_error" in r), None
    )
    if timm_row and result["config"]["dtype"] != "fp32":
        grad_error = _error(timm_row.get("gradient_relative_error"))
        note += (
            f" timm's own key-masked forward in {result['config']['dtype']} (same game, no shapkern code) "
            f"errs by {timm_row['relative_error']:.1e} (logits) and {grad_error} (gradients): the rounding "
            "of the dtype itself."
        )
    return note


def _phase_cells(row: dict, phase: str) -> list[str]:
    """evals/s (min–max ms), × best alternative, fraction of the floor."""
    stats = row.get(phase)
    if stats is None:
        return ["forward only" if row["forward_only"] and phase != "forward" else "—", "", ""]
    ratio = stats.get("vs_best_alternative")
    return [
        f"{_rate(stats['evals_per_s'])} ({stats['min_ms']:,.1f}–{stats['max_ms']:,.1f} ms)",
        "—" if ratio is None else f"×{ratio:.2f}",
        f"{stats['fraction_of_floor']:.0%}",
    ]


def markdown(result: dict) -> str:
    env, config = result["environment"], result["config"]
    phases = [p for p in PHASES if any(p in row for row in result["methods"])] or ["forward"]
    headers = ["method"]
    for phase in phases:
        headers += [f"{phase} evals/s (min–max time)", "× best alt.", "of floor"]
    headers += ["peak MiB", "rel. error", "grad. rel. error", "correct"]
    table = []
    for row in result["methods"]:
        if "unavailable" in row or ("failed" in row and "relative_error" not in row):
            reason = (
                f"unavailable: {row['unavailable']}" if "unavailable" in row else f"failed: {row['failed']}"
            )
            table.append([row["method"], reason])
            continue
        cells = [row["method"]]
        for phase in phases:
            cells += _phase_cells(row, phase)
        peaks = [row[p]["peak_mib"] for p in phases if p in row and row[p]["peak_mib"] is not None]
        cells += [
            f"{max(peaks):,.0f}" if peaks else "—",
            _error(row["relative_error"]),
            _error(row.get("gradient_relative_error")),
            ("yes" if row.get("correct") else "NO")
            + (f" (failed: {row['failed']})" if "failed" in row else ""),
        ]
        table.append(cells)
    best = {
        p: next(
            (r[p]["best_alternative"] for r in result["methods"] if "best_alternative" in r.get(p, {})), None
        )
        for p in phases
    }
    lines = [
        f"# Coalition throughput on {harness.hardware_name(env)}",
        "",
        (
            f"{config['model']}, {config['dtype']}, {config['images']} images × {config['coalitions']} "
            f"paired coalitions ({config['players']} players); torch {env['torch']}, triton {env['triton']}, "
            f"timm {env['timm']}, {env['date']}, {env['cpu']} ({env['cpu_threads']} threads). "
            f"Command: `{result['command']}`"
        ),
        "",
        (
            f"Evaluations per second: median of {config['repeats']} rounds, the methods timed round-robin "
            f"within each round (min–max time per call in brackets){_clock_note(config, env)}. "
            "× best alt.: over the fastest correct "
            "method outside shapkern ("
            + "; ".join(f"{p}: {name}" for p, name in best.items() if name)
            + "). Floor: packed FLOPs at the GEMM rate measured in this run, "
            f"{result['gemm_tflops']:.2f} TFLOP/s = {_rate(result['floor_evals_per_s']['forward'])} "
            "evaluations/s forward, a third of that with backward."
        ),
        "",
        _error_note(result),
        "",
        harness.markdown_table(headers, table),
    ]
    return "\n".join(lines)


def bar_chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["methods"] if "forward" in r]
    phases = [p for p in PHASES if any(p in r for r in rows)]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(9, 0.5 + 0.6 * len(rows)))
    height = 0.8 / len(phases)
    for i, phase in enumerate(phases):
        values = [r.get(phase, {}).get("evals_per_s", 0) for r in rows]
        ax.barh([j + i * height for j in range(len(rows))], values, height, label=phase)
        ax.axvline(result["floor_evals_per_s"][phase], color=f"C{i}", linestyle="--", linewidth=1)
    ax.set_yticks([j + height * (len(phases) - 1) / 2 for j in range(len(rows))], [r["method"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("evaluations / s (dashed: FLOP floor)")
    ax.set_title(f"{result['config']['model']} on {harness.hardware_name(result['environment'])}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None, **parse_options) -> dict:
    """Run the benchmark; ``parse_options`` go to :func:`parse_args` (bench_engine.py's sizes)."""
    args = parse_args(argv, **parse_options)
    harness.configure_cpu_threads()
    out = harness.results_dir(args.out, args.device)

    def write(result: dict) -> None:
        harness.write_results(out, args.stem, result, markdown(result))

    result = measure(args, on_update=write)
    bar_chart(result, out / f"{args.stem}.png")
    print(markdown(result))
    print(f"wrote {out}/{args.stem}.{{json,md,png}}")
    return result


if __name__ == "__main__":
    main()
