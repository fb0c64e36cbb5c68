"""Attention micro-benchmark at ViT shapes: shapkern's Triton varlen kernel against the alternatives.

    python benchmarks/bench_attention.py [--device cuda|cpu] [--dtype bf16] [--sequences 1024]

Sequence lengths are Shapley-kernel coalitions (paired) of N = 196 (224 px) and N = 576 (384 px)
patches plus a class token; 12 heads of dim 64. Methods: shapkern varlen (packed), SDPA on
complementary pairs with a dense block mask, FlexAttention with a document mask on the same rows,
and torch varlen_attn (packed). Reports forward and forward+backward TFLOP/s (useful FLOPs:
4·s²·H·D per sequence forward, 2.5× that backward) and checks each against an fp32 reference.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import common
import torch
import torch.nn.functional as F

import shapkern
from shapkern.ops.varlen_attention import varlen_attention_reference

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEADS, HEAD_DIM = 12, 64


def make_inputs(players: int, sequences: int, dtype, device):
    """Packed q, k, v (T, H, D) of paired Shapley-kernel coalitions, plus the pair grouping."""
    gen = torch.Generator(device=device).manual_seed(players)
    masks = shapkern.sample_coalitions(1, sequences, players, generator=gen)[0]
    lengths = (masks.sum(-1) + 1).to(torch.int32)
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    total = int(cu_seqlens[-1])
    q, k, v = (torch.randn(total, HEADS, HEAD_DIM, device=device, generator=gen).to(dtype) for _ in range(3))
    return q, k, v, cu_seqlens, players + 1, lengths


def _pair_rows(x, lengths):
    """(T, H, D) packed pairs -> (R/2, H, L, D) rows, L = sum of a pair's lengths, and the group ids."""
    pairs = lengths.view(-1, 2)
    width = int(pairs.sum(-1).max())
    rows = x.view(pairs.shape[0], width, *x.shape[1:]).transpose(1, 2)
    group = (torch.arange(width, device=x.device) >= pairs[:, :1]).long()
    return rows, group


def _from_rows(rows):
    return rows.transpose(1, 2).reshape(-1, *rows.shape[1:2], rows.shape[-1])


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


def _forward_backward(fn, grad, *inputs):
    fn(*inputs).backward(grad)


METHODS = {
    "shapkern varlen (Triton)": lambda q, k, v, cu, m, lengths: shapkern.ops.varlen_attention(q, k, v, cu, m),
    "pairs + dense mask, SDPA": sdpa_pairs,
    "pairs, FlexAttention": flex_pairs,
    "packed, torch varlen_attn": lambda q, k, v, cu, m, lengths: common._torch_varlen(q, k, v, cu, m),
}


def measure(args) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    rows = []
    for players in args.players:
        q, k, v, cu_seqlens, max_seqlen, lengths = make_inputs(players, args.sequences, dtype, device)
        # Pairs are laid out contiguously, so the dense-row methods see the same packed tokens.
        flops = float((4 * lengths.double() ** 2 * HEADS * HEAD_DIM).sum())
        want = varlen_attention_reference(q.float(), k.float(), v.float(), cu_seqlens, max_seqlen)
        for name, fn in METHODS.items():
            row = {"method": name, "players": players, "sequences": args.sequences}
            if device.type != "cuda" and name != "pairs + dense mask, SDPA":
                row["unavailable"] = "needs CUDA"
                rows.append(row)
                continue
            forward = partial(fn, q, k, v, cu_seqlens, max_seqlen, lengths)
            with torch.no_grad():
                row["relative_error"] = common.relative_error(forward(), want)
                fwd = common.time_fn(forward, device, repeats=args.repeats)
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
            step = partial(
                _forward_backward, fn, torch.randn_like(q), qg, kg, vg, cu_seqlens, max_seqlen, lengths
            )
            both = common.time_fn(step, device, repeats=args.repeats)
            row["forward_tflops"] = flops / (fwd["median_ms"] * 1e-3) / 1e12
            row["forward+backward_tflops"] = 3.5 * flops / (both["median_ms"] * 1e-3) / 1e12
            row["forward"], row["forward+backward"] = fwd, both
            rows.append(row)
            print(
                f"N={players:<4} {name:<28} fwd {row['forward_tflops']:7.2f} TFLOP/s  "
                f"fwd+bwd {row['forward+backward_tflops']:7.2f} TFLOP/s  err {row['relative_error']:.1e}",
                flush=True,
            )
    return {
        "environment": common.environment(device),
        "dtype": args.dtype,
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"# Varlen attention on {common.hardware_name(env)}",
        "",
        (
            f"{result['dtype']}, {result['heads']} heads × {result['head_dim']}; torch {env['torch']}, "
            f"triton {env['triton']}, {env['date']}. Paired Shapley-kernel coalition lengths + 1 class token."
        ),
        "",
        "| N | method | forward TFLOP/s | forward+backward TFLOP/s | rel. error |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        if "unavailable" in row:
            lines.append(f"| {row['players']} | {row['method']} | unavailable: {row['unavailable']} | | |")
        else:
            lines.append(
                f"| {row['players']} | {row['method']} | {row['forward_tflops']:.2f} | "
                f"{row['forward+backward_tflops']:.2f} | {row['relative_error']:.1e} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default=common.default_device(), choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default=None, choices=list(DTYPES))
    parser.add_argument("--players", type=int, nargs="+", default=[196, 576])
    parser.add_argument("--sequences", type=int, default=None, help="sequences per call (even)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.sequences = args.sequences or (1024 if args.device == "cuda" else 32)
    common.configure_cpu_threads()
    result = measure(args)
    out = common.results_dir(args.out, args.device)
    common.write_results(out, "attention", result, markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
