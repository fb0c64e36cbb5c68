"""Coalition throughput: shapkern against every alternative (benchmarks/baselines.py) in one run.

    python -m benchmarks.throughput [--device cuda|cpu] [--model vit_base_patch16_224] [--images 32]
                                    [--coalitions 32] [--dtype bf16|fp16|fp32] [--out DIR]

--model takes a timm VisionTransformer (class-token, average or SigLIP's latent attention pooling),
Eva (EVA-02, RoPE ViTs) or Beit name, with random weights and a 1000-class head; --img-size,
--patch-size, --depth, --embed-dim and --num-heads override its config (small CPU runs). A method
that cannot run the model's family (say, complementary pairs under Beit's fixed-size relative
position bias, or the fused kernels outside timm's ViT Block) gets a row saying why.

Reports evaluations per second (one evaluation = one image under one coalition), forward and
forward+backward, with the ratio to the best alternative (fastest method outside shapkern) and to
the FLOP floor (packed FLOPs over a GEMM rate measured in the same run), peak GPU memory, and the
error of every method against an fp32 reference on the same coalitions, logits and gradients: the
model's own forward with the absent patch tokens removed (benchmarks/families.py), one coalition
at a time on the first images.
Methods are timed round-robin (benchmarks/harness.py): one slow moment of the machine lands on
all methods of that round, not on one row. Writes throughput.{json,md,png}.

Sizes not given follow the device: on CUDA vit_base_patch16_224, bf16, 32 images, 10 repeats; on
the CPU vit_tiny_patch16_224, fp32, 2 images, 5 repeats.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from benchmarks import baselines, cases, families, harness
from benchmarks.throughput_render import CHECK_IMAGES, GRADIENT_CHECK_IMAGES, PHASES, bar_chart, markdown
from shapkern.engine import adapter_for

TOLERANCE = {"bf16": 1e-2, "fp16": 1e-2, "fp32": 1e-4}
FLOP_MODEL = "per block 2·(Linear weights)·s + 4·D·s² per coalition of s kept tokens (ViT: 24 D² s + 4 D s²)"
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
    parser.add_argument("--depth", type=int, help="number of blocks (default: the model's)")
    parser.add_argument("--embed-dim", type=int, help="token width (default: the model's)")
    parser.add_argument("--num-heads", type=int, help="attention heads (default: the model's)")
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
    games = {"token dropping": families.dropped_reference, "zero input": baselines.zero_input}
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


@dataclass
class _Setup:
    """What every method is checked and timed on: images in --dtype, paired coalitions (B, M, N)
    and the fp32 oracles of :func:`_oracles`."""

    device: torch.device
    model: nn.Module
    images: torch.Tensor
    coalitions: torch.Tensor
    oracle: dict
    backward: bool


def _dispatch_key(model: nn.Module, players: int) -> dict:
    """What the engine's dispatch table keys a route by (benchmarks/dispatch_table.py): the engine
    adapter's family and P + N; None for a model the engine does not run."""
    try:
        adapter = adapter_for(model)
    except NotImplementedError:
        return {"engine_family": None, "tokens": None}
    return {"engine_family": adapter.family, "tokens": adapter.num_prefix_tokens + players}


def _header(args, model, coalitions, device) -> dict:
    """The result without its rows: environment, command, config, the GEMM rate and the FLOP floor."""
    evaluations = coalitions.shape[0] * coalitions.shape[1]
    flops = baselines.packed_flops(model, coalitions)
    gemm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = 8192 if device.type == "cuda" else 1024
    gemm = harness.gemm_tflops(device, gemm_dtype, size=size, repeats=5, clock=args.clock)
    floor = {"forward": gemm * 1e12 / flops * evaluations}
    floor["forward+backward"] = floor["forward"] / 3
    return {
        "environment": harness.environment(device),
        "command": harness.command_line(),
        "config": {
            "model": args.model,
            "family": type(model).__name__,
            **_dispatch_key(model, coalitions.shape[2]),
            "compute_dtype": str(harness.DTYPES[args.dtype]).removeprefix("torch."),
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
        "flop_model": FLOP_MODEL,
        "floor_evals_per_s": floor,
        "tolerance": TOLERANCE[args.dtype],
        "methods": [],
    }


def _check_methods(args, setup: _Setup, result: dict, on_update) -> dict:
    """A row in result["methods"] for every selected method, with why it cannot run or its errors
    against the oracles; returns name -> method of those that ran."""
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
        result["methods"].append(row)
        reason = baselines.unavailable_reason(name, setup.device, setup.model)
        if reason:
            row["unavailable"] = reason
            print(f"{name:<36} unavailable: {reason}", flush=True)
            continue
        try:
            _check(row, method, setup.model, setup.images, setup.coalitions, setup.oracle, setup.backward)
            ready[name] = method
            print(f"{name:<36} error {row['relative_error']:.1e}, correct: {row['correct']}", flush=True)
        except NotImplementedError as error:  # a variant of the family the method does not run
            row["unavailable"] = str(error)
            print(f"{name:<36} unavailable: {error}", flush=True)
            setup.model.zero_grad(set_to_none=True)
        except Exception as error:  # noqa: BLE001 - one failing method must not hide the others
            row["failed"] = harness.failure(error)
        if "failed" in row:  # after the except clause, which holds the failed call's tensors
            setup.model.zero_grad(set_to_none=True)
            if setup.device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"{name:<36} failed: {row['failed']}", flush=True)
        if on_update:
            on_update(result)
    return ready


def _time_phase(args, setup: _Setup, phase: str, ready: dict, result: dict) -> None:
    """Time the ready methods of ``phase`` round-robin into their rows; a method that fails leaves
    ``ready``."""
    steps = {"forward": forward, "forward+backward": forward_backward}
    inputs = setup.images.clone().requires_grad_() if phase == "forward+backward" else setup.images
    fns = {
        name: partial(steps[phase], method.fn, setup.model, inputs, setup.coalitions)
        for name, method in ready.items()
        if phase == "forward" or not method.forward_only
    }
    timings = harness.time_interleaved(
        fns, setup.device, warmup=args.warmup, repeats=args.repeats, catch=True, clock=args.clock
    )
    setup.model.zero_grad(set_to_none=True)
    rows, evaluations = result["methods"], setup.coalitions.shape[0] * setup.coalitions.shape[1]
    for row in rows:
        stats = timings.get(row["method"])
        if stats is None:
            continue
        if "failed" in stats:
            row["failed"] = f"{phase}: {stats['failed']}"
            ready.pop(row["method"])
            continue
        stats["evals_per_s"] = evaluations / (stats["median_ms"] * 1e-3)
        stats["fraction_of_floor"] = stats["evals_per_s"] / result["floor_evals_per_s"][phase]
        row[phase] = stats
    _add_ratios(rows, phase)
    for row in rows:
        if phase in row:
            print(f"{row['method']:<36} {row[phase]['evals_per_s']:>12,.1f} evals/s {phase}", flush=True)


def measure(args, on_update=None) -> dict:
    """Every selected method's correctness, then its speed, timed round-robin with the others.

    on_update(result so far) runs after each method's check and after each timed phase, so that
    a run cut short keeps what it measured.
    """
    device, reference_model, model, images, coalitions = cases.timm_vit(args)
    result = _header(args, model, coalitions, device)
    backward = not args.no_backward
    oracle = _oracles(reference_model, images, coalitions, backward)
    low = images.to(harness.DTYPES[args.dtype])
    setup = _Setup(device, model, low, coalitions, oracle, backward)
    ready = _check_methods(args, setup, result, on_update)
    for phase in PHASES if backward else PHASES[:1]:
        _time_phase(args, setup, phase, ready, result)
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
