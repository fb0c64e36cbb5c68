"""Attention micro-benchmark at ViT shapes: shapkern's Triton varlen kernels against the alternatives.

    python -m benchmarks.bench_attention [--device cuda|cpu] [--dtype bf16] [--sequences 1024] [--out DIR]

Sequence lengths are Shapley-kernel coalitions (paired) of N = 196 (224 px) and N = 576 (384 px)
patches plus a class token; 12 heads of dim 64. Methods: shapkern varlen (packed) under both
schedules of its kernels (short: whole sequences per program, one backward kernel; long: one query
or key block per program, three backward kernels; the default takes short for max_seqlen <=
SHORT_MAX_SEQLEN), SDPA on complementary pairs with a dense block mask, FlexAttention with a
document mask on the same rows, and torch varlen_attn (packed). All methods are timed round-robin
in one run (benchmarks/harness.py). Reports forward and forward+backward TFLOP/s (useful FLOPs:
4·s²·H·D per sequence forward, 2.5× that backward) and checks each against an fp32 reference.
Writes attention.{json,md}.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F

import shapkern
from benchmarks import baselines, harness
from benchmarks.cases import HEAD_DIM, HEADS, attention_inputs
from shapkern.kernels import varlen_attention as kernels
from shapkern.ops.varlen_attention import varlen_attention_reference

# shapkern's rows: the kernels.SHORT_MAX_SEQLEN each runs under (inf: always short; 0: always long).
SCHEDULES = {
    "shapkern varlen, short schedule": {"fwd": float("inf"), "bwd": float("inf")},
    "shapkern varlen, long schedule": {"fwd": 0, "bwd": 0},
}


@contextmanager
def schedule(short_max_seqlen: dict):
    """Run shapkern's kernels under one schedule (kernels.SHORT_MAX_SEQLEN) inside the block."""
    saved = kernels.SHORT_MAX_SEQLEN
    kernels.SHORT_MAX_SEQLEN = short_max_seqlen
    try:
        yield
    finally:
        kernels.SHORT_MAX_SEQLEN = saved


def _pair_rows(x, lengths):
    """(T, H, D) packed pairs -> (R/2, H, L, D) rows, L = sum of a pair's lengths, and the group ids."""
    pairs = lengths.view(-1, 2)
    width = int(pairs.sum(-1).max())
    rows = x.view(pairs.shape[0], width, *x.shape[1:]).transpose(1, 2)
    group = (torch.arange(width, device=x.device) >= pairs[:, :1]).long()
    return rows, group


def _from_rows(rows):
    return rows.transpose(1, 2).reshape(-1, *rows.shape[1:2], rows.shape[-1])


def shapkern_varlen(q, k, v, cu_seqlens, max_seqlen, lengths):
    # The plan is valid by construction, as in the engine: no host sync for validation.
    return shapkern.ops.varlen_attention(q, k, v, cu_seqlens, max_seqlen, validate=False)


def sdpa_pairs(q, k, v, cu_seqlens, max_seqlen, lengths):
    (qr, group), kr, vr = _pair_rows(q, lengths), _pair_rows(k, lengths)[0], _pair_rows(v, lengths)[0]
    mask = (group.unsqueeze(2) == group.unsqueeze(1)).unsqueeze(1)
    return _from_rows(F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask))


_compiled_flex = None


def flex_pairs(q, k, v, cu_seqlens, max_seqlen, lengths):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    (qr, group), kr, vr = _pair_rows(q, lengths), _pair_rows(k, lengths)[0], _pair_rows(v, lengths)[0]
    rows, width = group.shape
    block_mask = create_block_mask(
        lambda b, h, i, j: group[b, i] == group[b, j], rows, None, width, width, device=q.device
    )
    return _from_rows(_compiled_flex(qr, kr, vr, block_mask=block_mask))


METHODS = {
    **dict.fromkeys(SCHEDULES, shapkern_varlen),
    "pairs + dense mask, SDPA": sdpa_pairs,
    "pairs, FlexAttention": flex_pairs,
    "packed, torch varlen_attn": lambda q, k, v, cu, m, lengths: baselines.torch_varlen(q, k, v, cu, m),
}
CPU_METHODS = ("pairs + dense mask, SDPA", *SCHEDULES)  # the CPU runs the PyTorch reference for shapkern


def _in_schedule(name: str, fn: Callable[[], object]) -> Callable[[], object]:
    """fn, run under shapkern's schedule of method ``name`` (forward and backward alike)."""
    if name not in SCHEDULES:
        return fn

    def run():
        with schedule(SCHEDULES[name]):
            return fn()

    return run


def _forward_backward(fn, grad, *inputs):
    fn(*inputs).backward(grad)


def measure(args) -> dict:
    device = torch.device(args.device)
    dtype = harness.DTYPES[args.dtype]
    rows = []
    for players in args.players:
        q, k, v, cu_seqlens, max_seqlen, lengths = attention_inputs(players, args.sequences, dtype, device)
        # Pairs are laid out contiguously, so the dense-row methods see the same packed tokens.
        flops = float((4 * lengths.double() ** 2 * HEADS * HEAD_DIM).sum())
        want = varlen_attention_reference(q.float(), k.float(), v.float(), cu_seqlens, max_seqlen)
        names = [n for n in METHODS if device.type == "cuda" or n in CPU_METHODS]
        forward, step, errors = {}, {}, {}
        for name in names:
            fn = METHODS[name]
            forward[name] = _in_schedule(name, partial(fn, q, k, v, cu_seqlens, max_seqlen, lengths))
            with torch.no_grad():
                errors[name] = harness.relative_error(forward[name](), want)
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
            grad = torch.randn_like(q)
            step[name] = _in_schedule(
                name, partial(_forward_backward, fn, grad, qg, kg, vg, cu_seqlens, max_seqlen, lengths)
            )
        with torch.no_grad():
            fwd = harness.time_interleaved(forward, device, repeats=args.repeats, catch=True)
        both = harness.time_interleaved(step, device, repeats=args.repeats, catch=True)
        default = {d: "short" if kernels.short_schedule(d, max_seqlen) else "long" for d in ("fwd", "bwd")}
        for name in METHODS:
            row = {"method": name, "players": players, "sequences": args.sequences}
            if name in SCHEDULES:
                row["default_schedule"] = [
                    d for d, which in default.items() if name.endswith(f"{which} schedule")
                ]
            if name not in names:
                row["unavailable"] = "needs CUDA"
            elif "failed" in fwd[name] or "failed" in both[name]:
                row["failed"] = fwd[name].get("failed") or both[name]["failed"]
            else:
                row["relative_error"] = errors[name]
                row["forward"], row["forward+backward"] = fwd[name], both[name]
                row["forward_tflops"] = flops / (fwd[name]["median_ms"] * 1e-3) / 1e12
                row["forward+backward_tflops"] = 3.5 * flops / (both[name]["median_ms"] * 1e-3) / 1e12
                print(
                    f"N={players:<4} {name:<34} fwd {row['forward_tflops']:7.2f} TFLOP/s  "
                    f"fwd+bwd {row['forward+backward_tflops']:7.2f} TFLOP/s  err {row['relative_error']:.1e}",
                    flush=True,
                )
            rows.append(row)
    return {
        "environment": harness.environment(device),
        "command": harness.command_line(),
        "dtype": args.dtype,
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "short_max_seqlen": kernels.SHORT_MAX_SEQLEN,
        "seqs_per_program": kernels.SEQS_PER_PROGRAM,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    env, limits = result["environment"], result["short_max_seqlen"]
    table = []
    for row in result["rows"]:
        default = row.get("default_schedule")
        method = row["method"] + (f" (default: {' and '.join(default)})" if default else "")
        if "unavailable" in row or "failed" in row:
            table.append([row["players"], method, row.get("unavailable") or f"failed: {row['failed']}"])
        else:
            table.append(
                [
                    row["players"],
                    method,
                    f"{row['forward_tflops']:.2f}",
                    f"{row['forward+backward_tflops']:.2f}",
                    f"{row['relative_error']:.1e}",
                ]
            )
    intro = (
        f"{result['dtype']}, {result['heads']} heads × {result['head_dim']}; torch {env['torch']}, "
        f"triton {env['triton']}, {env['date']}. Paired Shapley-kernel coalition lengths + 1 class token. "
        f"shapkern's default: short schedule (whole sequences, {result['seqs_per_program']} per program) "
        f"for max_seqlen ≤ {limits['fwd']} (forward) and ≤ {limits['bwd']} (backward), else long. "
        f"`{result['command']}`"
    )
    headers = ["N", "method", "forward TFLOP/s", "forward+backward TFLOP/s", "rel. error"]
    return f"# Varlen attention on {harness.hardware_name(env)}\n\n{intro}\n\n" + harness.markdown_table(
        headers, table, align="rlrrr"
    )


def main(argv=None) -> dict:
    parser = harness.argument_parser(__doc__)
    parser.add_argument(
        "--dtype", default=None, choices=list(harness.DTYPES), help="default: bf16 on CUDA, else fp32"
    )
    parser.add_argument("--players", type=int, nargs="+", default=[196, 576])
    parser.add_argument(
        "--sequences",
        type=int,
        default=None,
        help="sequences per call (even); default: 1024 on CUDA, else 32",
    )
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.sequences = args.sequences or (1024 if args.device == "cuda" else 32)
    harness.configure_cpu_threads()
    result = measure(args)
    out = harness.results_dir(args.out, args.device)
    harness.write_results(out, "attention", result, markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
