"""Schedule comparison and tile sweep of the Triton varlen attention kernels at ViT-B shapes (CUDA only).

    python -m benchmarks.tune_attention [--players 196] [--sequences 1024] [--kernels fwd ...] [--out DIR]

Both schedules of shapkern/kernels/varlen_attention.py on the same inputs: the long one (forward
"fwd"; backward "dkdv" + "dq" after the delta pass) and the short one (whole sequences per program:
"fwd_short", and "bwd_short", one kernel for dQ, dK and dV). The first rows time every kernel at its
default tile, so old and new schedule stand side by side; then candidate (BLOCK_M, BLOCK_N,
num_warps, num_stages) tiles per kernel with the others at their defaults, and SEQS_PER_PROGRAM
(sequences per program of the short schedule) at 1 and 4 against the default 2. "fwd" rows time the
forward launcher, the others the whole backward launcher; every candidate is checked against the
PyTorch reference. Writes tune_attention.{json,md} after every row, so a cut-off run keeps its rows.
"""

from __future__ import annotations

import torch
import triton.testing

from benchmarks import harness
from benchmarks.cases import HEAD_DIM, HEADS, attention_inputs
from shapkern.kernels import varlen_attention as kernels
from shapkern.ops.varlen_attention import varlen_attention_reference

# The first candidate of each kernel is its default in kernels._CONFIGS_16BIT (checked in sweep()).
CANDIDATES = {
    "fwd": [(64, 64, 4, 3), (64, 32, 4, 3)],
    "dkdv": [(32, 64, 4, 3), (16, 64, 4, 3)],
    "dq": [(64, 32, 4, 3), (64, 16, 4, 3)],
    "fwd_short": [(64, 32, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2)],
    "bwd_short": [
        (32, 64, 4, 2),
        (32, 64, 4, 3),
        (16, 64, 4, 2),
        (32, 64, 4, 1),
        (64, 64, 8, 2),
        (64, 128, 8, 2),
    ],
}
SEQS_CANDIDATES = (1, 4)
SHORT = {"fwd": False, "dkdv": False, "dq": False, "fwd_short": True, "bwd_short": True}


def _rows_to_run(names) -> list[tuple[str, tuple, int]]:
    """(kernel, tile, sequences per program): defaults first, then the other tiles, then SEQS."""
    default_seqs = kernels.SEQS_PER_PROGRAM
    runs = [(name, CANDIDATES[name][0], default_seqs) for name in names]
    runs += [(name, tile, default_seqs) for name in names for tile in CANDIDATES[name][1:]]
    runs += [(name, CANDIDATES[name][0], s) for name in names if SHORT[name] for s in SEQS_CANDIDATES]
    return runs


def sweep(players: int, sequences: int, names, on_row) -> list[dict]:
    q, k, v, cu_seqlens, max_seqlen, _ = attention_inputs(
        players, sequences, torch.bfloat16, torch.device("cuda")
    )
    scale = HEAD_DIM**-0.5
    dout = torch.randn_like(q)
    reference = [x.float().requires_grad_() for x in (q, k, v)]
    want_out = varlen_attention_reference(*reference, cu_seqlens, max_seqlen, scale)
    want_out.backward(dout.float())
    want_grads = [x.grad for x in reference]
    table = kernels._CONFIGS_16BIT
    saved = {name: table[name][HEAD_DIM] for name in names}
    saved_limit, saved_seqs = kernels.SHORT_MAX_SEQLEN, kernels.SEQS_PER_PROGRAM
    for name in names:
        if CANDIDATES[name][0] != saved[name]:
            raise SystemExit(
                f"CANDIDATES[{name!r}][0] = {CANDIDATES[name][0]} is not the default {saved[name]}"
            )
    rows = []
    try:
        for name, tile, seqs in _rows_to_run(names):
            table[name][HEAD_DIM] = tile
            limit = float("inf") if SHORT[name] else 0
            kernels.SHORT_MAX_SEQLEN = {"fwd": limit, "bwd": limit}
            kernels.SEQS_PER_PROGRAM = seqs
            row = {
                "kernel": name,
                "config": tile,
                "seqs_per_program": seqs if SHORT[name] else None,
                "default": tile == saved[name] and seqs == saved_seqs,
            }
            try:
                row.update(_time(name, q, k, v, dout, cu_seqlens, max_seqlen, scale, want_out, want_grads))
            except Exception as error:  # noqa: BLE001 - a tile too large for shared memory fails to launch
                row["failed"] = repr(error)
            table[name][HEAD_DIM] = saved[name]
            rows.append(row)
            print(row, flush=True)
            on_row(rows)
    finally:
        for name in names:
            table[name][HEAD_DIM] = saved[name]
        kernels.SHORT_MAX_SEQLEN, kernels.SEQS_PER_PROGRAM = saved_limit, saved_seqs
    return rows


def _time(name, q, k, v, dout, cu_seqlens, max_seqlen, scale, want_out, want_grads) -> dict:
    """Median time of the launcher running kernel ``name`` and its largest error against the reference."""
    out, lse = kernels.varlen_attention_forward(q, k, v, cu_seqlens, max_seqlen, scale)
    if name.startswith("fwd"):

        def run():
            return kernels.varlen_attention_forward(q, k, v, cu_seqlens, max_seqlen, scale)

        pairs = [(out, want_out)]  # the forward above already ran with the candidate tile
    else:

        def run():
            return kernels.varlen_attention_backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale)

        pairs = list(zip(run(), want_grads, strict=True))
    error = max(harness.relative_error(got, want) for got, want in pairs)
    return {"ms": triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median"), "error": error}


def markdown(payload: dict) -> str:
    env = payload["environment"]
    intro = (
        f"bf16, {HEADS} heads × {HEAD_DIM}, {payload['sequences']} paired Shapley-kernel coalitions of "
        f"N = {payload['players']} (+1 class token); torch {env['torch']}, triton {env['triton']}, "
        f"{env['date']}. Long schedule: fwd, and the backward as delta + dkdv + dq (a dkdv or dq row times "
        "the whole backward with the other kernel at its default). Short schedule: fwd_short, and "
        f"bwd_short (the whole backward). `{payload['command']}`"
    )
    table = []
    for row in payload["rows"]:
        kernel = row["kernel"] + (" (default)" if row["default"] else "")
        timing = (
            [f"{row['ms']:.3f}", f"{row['error']:.1e}"] if "ms" in row else [f"failed: {row['failed']}", None]
        )
        table.append([kernel, str(tuple(row["config"])), row["seqs_per_program"], *timing])
    headers = ["kernel", "BLOCK_M, BLOCK_N, warps, stages", "seqs/program", "ms", "rel. error"]
    return (
        f"# Varlen attention schedules and tiles on {harness.hardware_name(env)}\n\n{intro}\n\n"
        + harness.markdown_table(headers, table, align="llrrr")
    )


def main(argv=None) -> dict:
    parser = harness.argument_parser(__doc__, device=False)
    parser.add_argument("--players", type=int, default=196)
    parser.add_argument("--sequences", type=int, default=1024)
    parser.add_argument("--kernels", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tune_attention.py times Triton kernels and needs a CUDA GPU")
    out = harness.results_dir(args.out, "cuda")
    payload = {
        "environment": harness.environment(torch.device("cuda")),
        "command": harness.command_line(),
        "players": args.players,
        "sequences": args.sequences,
        "rows": [],
    }

    def write(rows):
        payload["rows"] = rows
        harness.write_results(out, "tune_attention", payload, markdown(payload))

    sweep(args.players, args.sequences, args.kernels, write)
    print(markdown(payload))
    return payload


if __name__ == "__main__":
    main()
