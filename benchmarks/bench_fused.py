"""Benchmark the fused ops between a ViT block's GEMMs against their unfused PyTorch formulations.

    python -m benchmarks.bench_fused [--device cuda|cpu] [--tokens T] [--dim D] [--hidden H] [--tune]
                                     [--no-compile] [--out DIR]

Each op runs three ways on the same inputs: shapkern's fused op, the plain PyTorch formulation (eager),
and torch.compile of that formulation (default mode), forward (under no_grad, as inference runs) and
forward + backward (torch.autograd.grad of every output, so no .grad accumulation is timed). Times are
CUDA-event medians; every row also gives the output's relative error against float64 and the effective
bandwidth (memory-bound ops, bytes an ideal one-pass kernel moves) or TFLOP/s (the GEMM).

Ops: residual add + LayerNorm (with and without LayerScale, and autocast's fp32 stream + 16-bit branch),
plain LayerNorm, and fc1 + bias + exact GELU; for the latter also cuBLASLt's GELU epilogue
(torch._addmm_activation), which uses the tanh approximation, so its error shows what that costs.
--tune times the candidate tiles of the Triton GEMM (forward) and reports the fastest.

Defaults: vit_base_patch16_224 with 32 images x 32 paired coalitions, T = 32 * 32 * (1 + 196 / 2)
packed tokens, D = 768, H = 3072, bf16 on CUDA; a tiny fp32 smoke run on the CPU, where shapkern's ops
run their PyTorch references.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks import harness
from shapkern.ops.layer_norm import add_layer_norm, add_layer_norm_reference, layer_norm
from shapkern.ops.linear_gelu import linear_gelu, linear_gelu_reference

EPS = 1e-6
# No-spill tiles (tests/test_kernels_compile_fused.py checks the default; these were checked with the same
# ptxas run): (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages).
GEMM_CANDIDATES = [
    (128, 256, 64, 8, 8, 3),
    (128, 256, 64, 8, 8, 4),
    (128, 128, 64, 8, 8, 3),
    (128, 128, 64, 8, 8, 4),
    (128, 128, 64, 8, 4, 4),
]


@dataclass
class Case:
    """One op: leaves requiring grad, methods name -> fn(*leaves) -> tuple of outputs, a float64 reference."""

    name: str
    leaves: list[torch.Tensor]
    methods: dict[str, Callable]
    reference: Callable
    bytes: tuple[int, int] | None = None  # moved by an ideal kernel: forward, forward + backward
    flops: tuple[float, float] | None = None


def _size(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _add_norm_case(name, x, y, w, b, gamma=None, out_dtype=None) -> Case:
    def eager(x, y, w, b, *g):
        s = x + (y * g[0] if g else y)
        h = F.layer_norm(s, s.shape[-1:], w, b, EPS)
        return s, h if out_dtype is None else h.to(out_dtype)

    def fused(x, y, w, b, *g):
        return add_layer_norm(x, y, w, b, EPS, *g, out_dtype=out_dtype)

    def reference(x, y, w, b, *g):
        return add_layer_norm_reference(x, y, w, b, EPS, *g)

    leaves = [t for t in (x, y, w, b, gamma) if t is not None]
    h = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    forward = _size(x, y, x, h)  # read x, y; write s, h
    # Read grad_s, grad_h, s (and y for the LayerScale grad); write grad_x (and grad_y when it differs).
    backward = _size(x, h, x, x) + _size(y) * (
        (gamma is not None) + (gamma is not None or x.dtype != y.dtype)
    )
    return Case(
        name, leaves, {"shapkern": fused, "eager": eager}, reference, bytes=(forward, forward + backward)
    )


def cases(args, device: torch.device):
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    T, D, H = args.tokens, args.dim, args.hidden

    def rand(*shape, scale=1.0, shift=0.0, dtype=dtype):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(device, dtype).requires_grad_()

    x, y = rand(T, D), rand(T, D)
    w, b, gamma = rand(D, scale=0.1, shift=1.0), rand(D, scale=0.1), rand(D, scale=0.1)
    yield _add_norm_case("add + LayerNorm", x, y, w, b)
    yield _add_norm_case("add + LayerScale + LayerNorm", x, y, w, b, gamma)
    if dtype != torch.float32:
        params = [t.detach().float().requires_grad_() for t in (w, b)]
        stream = x.detach().float().requires_grad_()
        yield _add_norm_case("add + LayerNorm, fp32 stream (autocast)", stream, y, *params, out_dtype=dtype)
    yield Case(
        "LayerNorm",
        [x, w, b],
        {
            "shapkern": lambda x, w, b: (layer_norm(x, w, b, EPS),),
            "eager": lambda x, w, b: (F.layer_norm(x, (D,), w, b, EPS),),
        },
        lambda x, w, b: (F.layer_norm(x, (D,), w, b, EPS),),
        bytes=(_size(x, x), _size(x, x, x, x)),
    )
    h = rand(T, D)
    fc1_w, fc1_b = rand(H, D, scale=D**-0.5), rand(H, scale=0.5)
    methods = {
        "shapkern": lambda x, w, b: (linear_gelu(x, w, b),),
        "eager": lambda x, w, b: (F.gelu(F.linear(x, w, b)),),
    }
    if device.type == "cuda":
        methods["cuBLASLt GELU epilogue (tanh)"] = lambda x, w, b: (
            torch._addmm_activation(b, x, w.t(), use_gelu=True),
        )
    flops = 2.0 * T * D * H
    yield Case(
        "fc1 + bias + GELU",
        [h, fc1_w, fc1_b],
        methods,
        lambda x, w, b: (linear_gelu_reference(x, w, b),),
        flops=(flops, 3 * flops),
    )


def _relative_error(outputs, want) -> float:
    return max(harness.relative_error(got, ref) for got, ref in zip(outputs, want, strict=True))


def run_case(case: Case, device: torch.device, args) -> list[dict]:
    with torch.no_grad():
        want = case.reference(*(t.detach().double() for t in case.leaves))
    methods = dict(case.methods)
    if args.compile:
        methods["eager, torch.compile"] = torch.compile(case.methods["eager"])
    rows = []
    for method, fn in methods.items():
        with torch.no_grad():
            outputs = fn(*case.leaves)
        error = _relative_error(outputs, want)
        grads = [torch.randn_like(t) for t in outputs]

        def forward(fn=fn):
            with torch.no_grad():
                fn(*case.leaves)

        def forward_backward(fn=fn, grads=grads):
            torch.autograd.grad(fn(*case.leaves), case.leaves, grads)

        for phase, run in (("forward", forward), ("forward+backward", forward_backward)):
            row = {"op": case.name, "method": method, "phase": phase, "relative_error": error}
            try:
                row |= harness.time_fn(run, device, warmup=args.warmup, repeats=args.repeats)
            except RuntimeError as failure:  # e.g. an op without a backward
                rows.append(row | {"failed": str(failure).splitlines()[0]})
                continue
            seconds = row["median_ms"] * 1e-3
            work = 0 if phase == "forward" else 1
            if case.bytes:
                row["gb_per_s"] = case.bytes[work] / seconds / 1e9
            if case.flops:
                row["tflops"] = case.flops[work] / seconds / 1e12
            rows.append(row)
    for row in rows:
        if "median_ms" not in row:
            continue
        for base in ("eager", "eager, torch.compile"):
            match = [
                r for r in rows if r["method"] == base and r["phase"] == row["phase"] and "median_ms" in r
            ]
            if match:
                row[f"speedup_vs_{'compiled' if 'compile' in base else 'eager'}"] = (
                    match[0]["median_ms"] / row["median_ms"]
                )
    return rows


def tune_gemm(args, device: torch.device) -> list[dict]:
    """Forward time of each candidate tile of the Triton GEMM + GELU, fastest first."""
    from shapkern.kernels.linear_gelu import linear_gelu_forward

    dtype = getattr(torch, args.dtype)
    x = torch.randn(args.tokens, args.dim, device=device, dtype=dtype)
    w = torch.randn(args.hidden, args.dim, device=device, dtype=dtype) * args.dim**-0.5
    b = torch.randn(args.hidden, device=device, dtype=dtype)
    flops = 2.0 * args.tokens * args.dim * args.hidden
    rows = []
    for config in GEMM_CANDIDATES:
        for store in (False, True):
            stats = harness.time_fn(
                lambda config=config, store=store: linear_gelu_forward(x, w, b, store, config),
                device,
                warmup=args.warmup,
                repeats=args.repeats,
            )
            rows.append({"config": config, "store_preactivation": store, **stats})
            rows[-1]["tflops"] = flops / (stats["median_ms"] * 1e-3) / 1e12
    return sorted(rows, key=lambda r: (r["store_preactivation"], r["median_ms"]))


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"# Fused ops between the GEMMs ({result['environment'].get('gpu', 'CPU')})",
        "",
        f"T = {cfg['tokens']} tokens, D = {cfg['dim']}, hidden = {cfg['hidden']}, {cfg['dtype']}; "
        "forward under no_grad; medians of CUDA events (wall clock on the CPU).",
        "",
        "| op | method | phase | ms | GB/s or TFLOP/s | vs eager | vs compiled | rel. error |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if "failed" in r:
            lines.append(f"| {r['op']} | {r['method']} | {r['phase']} | failed: {r['failed']} | | | | |")
            continue
        rate = f"{r['gb_per_s']:.0f} GB/s" if "gb_per_s" in r else f"{r['tflops']:.1f} TFLOP/s"
        speedups = [f"{r[k]:.2f}x" if k in r else "" for k in ("speedup_vs_eager", "speedup_vs_compiled")]
        lines.append(
            f"| {r['op']} | {r['method']} | {r['phase']} | {r['median_ms']:.3f} | {rate} | "
            f"{speedups[0]} | {speedups[1]} | {r['relative_error']:.1e} |"
        )
    if result.get("gemm_tune"):
        lines += [
            "",
            "| GEMM tile (M, N, K, group, warps, stages) | stores z | ms | TFLOP/s |",
            "|---|---|---:|---:|",
        ]
        for r in result["gemm_tune"]:
            lines.append(
                f"| {r['config']} | {r['store_preactivation']} | {r['median_ms']:.3f} | {r['tflops']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = harness.argument_parser(__doc__)
    parser.add_argument("--tokens", type=int, help="T (default: vit_base 32 x 32 paired on CUDA, 256 on CPU)")
    parser.add_argument("--dim", type=int, help="D (default 768 on CUDA, 64 on CPU)")
    parser.add_argument("--hidden", type=int, help="MLP hidden width (default 4 D)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default bf16 on CUDA")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile rows")
    parser.add_argument("--tune", action="store_true", help="also time the GEMM tile candidates (CUDA)")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.tokens = args.tokens or (32 * 32 * (1 + 196 // 2) if cuda else 256)
    args.dim = args.dim or (768 if cuda else 64)
    args.hidden = args.hidden or 4 * args.dim
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if not cuda:
        harness.configure_cpu_threads()

    result = {
        "environment": harness.environment(device),
        "config": {k: getattr(args, k) for k in ("tokens", "dim", "hidden", "dtype", "repeats", "compile")},
        "rows": [],
    }
    for case in cases(args, device):
        result["rows"] += run_case(case, device, args)
        if cuda:
            torch.cuda.empty_cache()
    if args.tune and cuda:
        result["gemm_tune"] = tune_gemm(args, device)
    table = markdown(result)
    print(table)
    out = harness.results_dir(args.out, device)
    harness.write_results(out, "fused", result, table)
    print(f"results in {out}")


if __name__ == "__main__":
    main()
