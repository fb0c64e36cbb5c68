"""Block-size sweep for the Triton varlen attention kernels at ViT-B coalition shapes (CUDA only).

    python benchmarks/tune_attention.py [--players 196] [--sequences 1024] [--out DIR]

For each kernel (forward, dK/dV, dQ) it times candidate (BLOCK_M, BLOCK_N, num_warps,
num_stages) tiles with the others at their defaults, checks every candidate against the
PyTorch reference, and writes tune_attention.{json,md}: the data behind the defaults in
shapkern/kernels/varlen_attention.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import common
import torch
import triton.testing
from bench_attention import HEAD_DIM, HEADS, make_inputs

from shapkern.kernels import varlen_attention as kernels
from shapkern.ops.varlen_attention import varlen_attention_reference

CANDIDATES = {
    "fwd": [
        (64, 64, 4, 3),
        (64, 32, 4, 3),
        (32, 64, 4, 3),
        (128, 64, 4, 3),
        (128, 64, 8, 3),
        (64, 128, 4, 2),
    ],
    "dkdv": [
        (32, 64, 4, 3),
        (16, 64, 4, 3),
        (64, 64, 4, 3),
        (32, 128, 4, 3),
        (64, 128, 8, 2),
        (32, 32, 4, 3),
    ],
    "dq": [(64, 32, 4, 3), (32, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2), (64, 16, 4, 3)],
}


def sweep(players: int, sequences: int) -> list[dict]:
    q, k, v, cu_seqlens, max_seqlen, _ = make_inputs(players, sequences, torch.bfloat16, torch.device("cuda"))
    scale = HEAD_DIM**-0.5
    dout = torch.randn_like(q)
    reference = [x.float().requires_grad_() for x in (q, k, v)]
    want_out = varlen_attention_reference(*reference, cu_seqlens, max_seqlen, scale)
    want_out.backward(dout.float())
    wants = {"fwd": [want_out.detach()], "dkdv": [x.grad for x in reference[1:]], "dq": [reference[0].grad]}
    table = kernels._CONFIGS_16BIT
    rows = []
    for kernel, candidates in CANDIDATES.items():
        default = table[kernel][HEAD_DIM]
        for config in candidates:
            table[kernel][HEAD_DIM] = config
            row = {"kernel": kernel, "config": config, "default": config == default}
            try:
                row.update(_time_config(kernel, q, k, v, dout, cu_seqlens, max_seqlen, scale, wants[kernel]))
            except Exception as error:  # noqa: BLE001 - a tile too large for shared memory fails to launch
                row["failed"] = repr(error)
            rows.append(row)
            print(row, flush=True)
        table[kernel][HEAD_DIM] = default
    return rows


def _time_config(kernel, q, k, v, dout, cu_seqlens, max_seqlen, scale, wants) -> dict:
    """Median time of one kernel's launcher and its largest error against the reference."""
    out, lse = kernels.varlen_attention_forward(q, k, v, cu_seqlens, max_seqlen, scale)
    if kernel == "fwd":

        def run():
            return kernels.varlen_attention_forward(q, k, v, cu_seqlens, max_seqlen, scale)

        got = [out]  # the forward above already ran with the candidate tile
    else:

        def run():
            return kernels.varlen_attention_backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale)

        dq, dk, dv = run()
        got = [dk, dv] if kernel == "dkdv" else [dq]
    error = max(common.relative_error(g, w) for g, w in zip(got, wants))
    return {"ms": triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median"), "error": error}


def markdown(payload: dict) -> str:
    env = payload["environment"]
    lines = [
        f"# Varlen attention tile sweep on {common.hardware_name(env)}",
        "",
        (
            f"bf16, {HEADS} heads × {HEAD_DIM}, {payload['sequences']} paired Shapley-kernel coalitions of N = "
            f"{payload['players']} (+1 class token); torch {env['torch']}, triton {env['triton']}, {env['date']}. "
            "dK/dV and dQ rows time the whole backward (preprocess + both kernels) with the other kernel at its "
            "default."
        ),
        "",
        "| kernel | BLOCK_M, BLOCK_N, warps, stages | ms | rel. error |",
        "|---|---|---|---|",
    ]
    for row in payload["rows"]:
        mark = " (default)" if row["default"] else ""
        timing = f"{row['ms']:.3f} | {row['error']:.1e}" if "ms" in row else f"failed: {row['failed']} |"
        lines.append(f"| {row['kernel']} | {tuple(row['config'])}{mark} | {timing} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--players", type=int, default=196)
    parser.add_argument("--sequences", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tune_attention.py times Triton kernels and needs a CUDA GPU")
    payload = {
        "environment": common.environment(torch.device("cuda")),
        "players": args.players,
        "sequences": args.sequences,
        "rows": sweep(args.players, args.sequences),
    }
    out = common.results_dir(args.out, "cuda")
    common.write_results(out, "tune_attention", payload, markdown(payload))
    print(markdown(payload))
    return payload


if __name__ == "__main__":
    main()
