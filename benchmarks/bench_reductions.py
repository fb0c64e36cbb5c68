"""shapkern's reductions over coalitions against their PyTorch formulations, timed in one run.

    python -m benchmarks.bench_reductions [--device cuda|cpu] [--batch 32 --coalitions 1024 ...] [--out DIR]

Every row times a shapkern op and the plain PyTorch computation of the same result round-robin
(benchmarks/harness.py), and checks both against a float64 reference first (relative error to the
largest output; fp32 tolerance 1e-5):

- coalition_reduce, forward and forward+backward: ``torch.einsum("bmn,bm,bmk->bnk")`` over bool
  masks converted to the dtype (the masks are given unpacked, which favours PyTorch); backward
  through autograd on both sides.
- coalition_gram, equal weights (KernelSHAP's A = E[z zᵀ]) and random weights:
  ``torch.einsum("bmi,bm,bmj->bij")`` over the bool masks.
- segment_sum: ``index_add_`` over a repeat_interleave'd sequence index; segment_expand:
  ``repeat_interleave``; both on --segments sequences of random length in [0, N].
- pack_coalitions / unpack_coalitions: their PyTorch references.

Defaults are the sizes of issue 15 (B = 32, M = 1024, N = 196, K = 1000, fp32). ``--sweep`` also
times a few tile configurations of the Triton kernels (CUDA only) and reports them apart.
Writes reductions.{json,md}.
"""

from __future__ import annotations

import torch

from benchmarks import harness
from shapkern.ops import _extension as ext
from shapkern.ops import bitpack as B
from shapkern.ops import gram as G
from shapkern.ops import reduce as R

try:
    from shapkern.kernels import coalition_reduce as gemm
except ImportError:  # no triton
    gemm = None

DTYPES = {**harness.DTYPES, "fp64": torch.float64}
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# Alternative Triton tiles for --sweep (the first of each is the shipped configuration).
SWEEP = {
    "forward": [
        {"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_M": 32, "num_warps": 4, "num_stages": 3},
        {"BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_M": 32, "num_warps": 8, "num_stages": 3},
        {"BLOCK_N": 64, "BLOCK_K": 128, "BLOCK_M": 64, "num_warps": 8, "num_stages": 2},
    ],
    "gram": [
        {"BLOCK_N": 64, "BLOCK_M": 64, "num_warps": 8, "num_stages": 3},
        {"BLOCK_N": 32, "BLOCK_M": 64, "num_warps": 4, "num_stages": 3},
    ],
}


def relative_to_max(got, want) -> float:
    """max |got - want| / max |want| in float64 (inf if got is not finite); tuples: the worst part."""
    if isinstance(want, tuple):
        return max(relative_to_max(a, b) for a, b in zip(got, want, strict=True))
    got, want = got.double(), want.double()
    if got.numel() == 0:
        return 0.0
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-30))


def cases(args, device: torch.device):
    """Yield (name, shapkern fn, PyTorch fn, float64 reference) on fresh random inputs."""
    g = torch.Generator().manual_seed(0)
    dtype = DTYPES[args.dtype]
    b, m, n, k = args.batch, args.coalitions, args.players, args.classes
    mask = (torch.rand(b, m, n, generator=g) < 0.5).to(device)
    values = torch.randn(b, m, k, generator=g).to(device, dtype)
    weights = torch.rand(b, m, generator=g).to(device, dtype)
    grad = torch.randn(b, n, k, generator=g).to(device, dtype)
    packed = B.pack_coalitions(mask)
    yield from _reduce_cases(mask, packed, values, weights, grad)
    yield from _gram_cases(mask, packed, weights)
    yield from _segment_cases(args, g, dtype, device)
    yield (
        "pack_coalitions",
        lambda: B.pack_coalitions(mask),
        lambda: B.pack_coalitions_reference(mask),
        lambda: packed,
    )
    yield (
        "unpack_coalitions",
        lambda: B.unpack_coalitions(packed, n),
        lambda: B.unpack_coalitions_reference(packed, n),
        lambda: mask,
    )


def _reduce_cases(mask, packed, values, weights, grad):
    """coalition_reduce, forward and forward+backward, on masks (B, M, N), values (B, M, K), weights
    (B, M) and the output gradient (B, N, K)."""
    n, dtype = mask.shape[-1], values.dtype
    z64, w64, v64 = mask.double(), weights.double(), values.double()
    yield (
        "coalition_reduce",
        lambda: R.coalition_reduce(packed, values, weights, n)[0],
        lambda: torch.einsum("bmn,bm,bmk->bnk", mask.to(dtype), weights, values),
        lambda: torch.einsum("bmn,bm,bmk->bnk", z64, w64, v64),
    )

    def backward(fn):
        """(grad_values, grad_weights) of fn(values, weights) for the output gradient ``grad``."""
        v, w = values.detach().requires_grad_(True), weights.detach().requires_grad_(True)
        return torch.autograd.grad(fn(v, w), (v, w), grad)

    def backward_reference():
        zg = z64 @ grad.double()
        return w64[..., None] * zg, (zg * v64).sum(-1)

    yield (
        "coalition_reduce fwd+bwd",
        lambda: backward(lambda v, w: R.coalition_reduce(packed, v, w, n)[0]),
        lambda: backward(lambda v, w: torch.einsum("bmn,bm,bmk->bnk", mask.to(dtype), w, v)),
        backward_reference,
    )


def _gram_cases(mask, packed, weights):
    """coalition_gram with equal weights (KernelSHAP's A = E[z zᵀ]) and with random weights (B, M)."""
    n, m = mask.shape[-1], mask.shape[1]

    def dense_gram(w):
        z = mask.to(w.dtype)
        return torch.einsum("bmi,bm,bmj->bij", z, w, z)

    for kind, gram_weights in (
        ("equal weights", torch.full_like(weights, 1 / m)),
        ("random weights", weights),
    ):
        yield (
            f"coalition_gram, {kind}",
            lambda w=gram_weights: G.coalition_gram(packed, w, n),
            lambda w=gram_weights: dense_gram(w),
            lambda w=gram_weights: dense_gram(w.double()),
        )


def _segment_cases(args, g: torch.Generator, dtype: torch.dtype, device: torch.device):
    """segment_sum and segment_expand on --segments sequences of random length in [0, N]."""
    n, k = args.players, args.classes
    lengths = torch.randint(0, n + 1, (args.segments,), generator=g).to(device)
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    tokens = torch.randn(int(lengths.sum()), k, generator=g).to(device, dtype)
    rows = torch.randn(args.segments, k, generator=g).to(device, dtype)
    seq = torch.repeat_interleave(torch.arange(args.segments, device=device), lengths)

    def index_add(acc_dtype):
        index = torch.repeat_interleave(torch.arange(args.segments, device=device), lengths)
        return torch.zeros(args.segments, k, device=device, dtype=acc_dtype).index_add_(
            0, index, tokens.to(acc_dtype)
        )

    yield (
        "segment_sum",
        lambda: R.segment_sum(tokens, cu),
        lambda: index_add(dtype),
        lambda: index_add(torch.float64),
    )
    yield (
        "segment_expand",
        lambda: R.segment_expand(rows, cu, tokens.shape[0]),
        lambda: rows.repeat_interleave(lengths, dim=0),
        lambda: rows.double()[seq],
    )


def measure(args) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    tol = TOLERANCE[dtype]
    rows = []
    for name, ours, theirs, reference in cases(args, device):
        want = reference()
        errors = [relative_to_max(fn(), want) for fn in (ours, theirs)]
        del want
        stats = harness.time_interleaved(
            {"shapkern": ours, "torch": theirs}, device, warmup=args.warmup, repeats=args.repeats
        )
        row = {
            "op": name,
            "shapkern_ms": stats["shapkern"]["median_ms"],
            "torch_ms": stats["torch"]["median_ms"],
            "speedup": stats["torch"]["median_ms"] / stats["shapkern"]["median_ms"],
            "shapkern_error": errors[0],
            "torch_error": errors[1],
            "correct": errors[0] <= tol,
            "timings": stats,
        }
        rows.append(row)
        print(
            f"{name:<30}{row['shapkern_ms']:>10.3f}{row['torch_ms']:>10.3f}{row['speedup']:>8.2f}x"
            f"  error {errors[0]:.1e} (torch {errors[1]:.1e}){'' if row['correct'] else '  WRONG'}",
            flush=True,
        )
    return {
        "environment": harness.environment(device),
        "command": harness.command_line(),
        "config": {
            "batch": args.batch,
            "coalitions": args.coalitions,
            "players": args.players,
            "classes": args.classes,
            "segments": args.segments,
            "dtype": args.dtype,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "timing": "interleaved",
            "tolerance": tol,
            "extension_loaded": ext.extension_loaded(),
            "cuda_kernels": ext.has_cuda_kernels(),
            "triton_configs": gemm.CONFIGS if gemm is not None and device.type == "cuda" else None,
        },
        "results": rows,
        "sweep": sweep(args, device) if args.sweep else None,
    }


def sweep(args, device: torch.device) -> list[dict]:
    """Time the shipped Triton tiles and the SWEEP alternatives on the forward and Gram kernels."""
    if device.type != "cuda" or gemm is None:
        return []
    g = torch.Generator().manual_seed(1)
    b, m, n, k = args.batch, args.coalitions, args.players, args.classes
    mask = (torch.rand(b, m, n, generator=g) < 0.5).to(device)
    packed = B.pack_coalitions(mask)
    values = torch.randn(b, m, k, generator=g).to(device)
    weights = torch.rand(b, m, generator=g).to(device)
    calls = {
        "forward": (
            lambda: gemm.coalition_reduce_forward(packed, values, weights, n)[0],
            torch.einsum("bmn,bm,bmk->bnk", mask.double(), weights.double(), values.double()),
        ),
        "gram": (
            lambda: gemm.coalition_gram(packed, weights, n),
            torch.einsum("bmi,bm,bmj->bij", mask.double(), weights.double(), mask.double()),
        ),
    }
    shipped = {kernel: dict(cfg) for kernel, cfg in gemm.CONFIGS.items()}
    out = []
    try:
        for kernel, (fn, want) in calls.items():
            candidates = {f"{kernel} #{i}": cfg for i, cfg in enumerate([shipped[kernel], *SWEEP[kernel]])}
            fns, errors = {}, {}
            for label, cfg in candidates.items():

                def run(cfg=cfg, kernel=kernel, fn=fn):
                    gemm.CONFIGS[kernel] = cfg
                    return fn()

                fns[label] = run
                errors[label] = relative_to_max(run(), want)
            stats = harness.time_interleaved(fns, device, warmup=1, repeats=args.repeats, catch=True)
            for label, cfg in candidates.items():
                entry = {"kernel": kernel, "config": cfg, "error": errors[label], **stats[label]}
                out.append(entry)
                print(f"sweep {label}: {cfg} {entry.get('median_ms', entry.get('failed'))}", flush=True)
    finally:
        gemm.CONFIGS.update(shipped)
    return out


def markdown(result: dict) -> str:
    env, config = result["environment"], result["config"]
    table = [
        [
            row["op"],
            f"{row['shapkern_ms']:.3f}",
            f"{row['torch_ms']:.3f}",
            f"×{row['speedup']:.2f}",
            f"{row['shapkern_error']:.1e}" + ("" if row["correct"] else " (WRONG)"),
            f"{row['torch_error']:.1e}",
        ]
        for row in result["results"]
    ]
    lines = [
        f"# Reductions over coalitions on {harness.hardware_name(env)}",
        "",
        (
            f"B = {config['batch']} images, M = {config['coalitions']} coalitions, N = {config['players']} "
            f"players, K = {config['classes']} values, {config['segments']} segments, {config['dtype']}; "
            f"torch {env['torch']}, triton {env['triton']}, {env['date']}. Command: `{result['command']}`"
        ),
        "",
        (
            f"Median of {config['repeats']} calls, shapkern and PyTorch timed round-robin; × = PyTorch "
            f"time / shapkern time. Errors: max |out − ref| / max |ref| against float64 (shapkern tolerance "
            f"{config['tolerance']:g})."
        ),
        "",
        harness.markdown_table(
            ["op", "shapkern ms", "PyTorch ms", "×", "shapkern error", "PyTorch error"], table, align="lrrrrr"
        ),
    ]
    if result.get("sweep"):
        sweep_rows = [
            [
                row["kernel"],
                str(row["config"]),
                row.get("median_ms", row.get("failed")),
                f"{row['error']:.1e}",
            ]
            for row in result["sweep"]
        ]
        lines += [
            "",
            "Triton tiles (#0 shipped):",
            "",
            harness.markdown_table(["kernel", "config", "ms", "error"], sweep_rows),
        ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = harness.argument_parser(__doc__)
    parser.add_argument("--batch", type=int, default=32, help="B, images")
    parser.add_argument("--coalitions", type=int, default=1024, help="M, coalitions per image")
    parser.add_argument("--players", type=int, default=196, help="N, patches")
    parser.add_argument("--classes", type=int, default=1000, help="K, values per coalition")
    parser.add_argument("--segments", type=int, default=1024, help="sequences for segment_sum/expand")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per candidate")
    parser.add_argument("--sweep", action="store_true", help="also time alternative Triton tiles (CUDA)")
    args = parser.parse_args(argv)
    harness.configure_cpu_threads()
    out = harness.results_dir(args.out, args.device)
    result = measure(args)
    text = markdown(result)
    harness.write_results(out, "reductions", result, text)
    print(text)
    print(f"wrote {out}/reductions.{{json,md}}")
    if not all(row["correct"] for row in result["results"]):
        raise SystemExit("some shapkern outputs are outside the tolerance")
    return result


if __name__ == "__main__":
    main()
