"""The peer study's settings: where references are exact, the peer libraries, the command line."""

from __future__ import annotations

from pathlib import Path

from benchmarks import harness
from benchmarks.experiments.peers.methods import Method

EXACT_PLAYERS = 16  # references enumerate all 2^N coalitions up to here
REFERENCE_SEED = 12345  # distinct from the runs' seeds (0, 1, ...)
LIBRARIES = ("captum", "shap", "shapiq")


def parse_args(argv, description: str):
    """The study's command line (``description``: the ``--help`` text), with ``--model-kwargs``
    parsed into a dict and ``--batch-size`` defaulted per device."""
    parser = harness.argument_parser(description)
    parser.prog = f"python -m {__package__}"
    add = parser.add_argument
    add("--model", default="vit_tiny_patch16_224", help="timm ViT, random weights")
    add("--checkpoint", type=Path, help="a `shapkern train` checkpoint instead of --model (default: none)")
    add("--model-kwargs", nargs="*", default=[], help="extra timm arguments, e.g. depth=1 embed_dim=32")
    add("--patch-size", type=int, help="patch size (default: the model's)")
    add("--settings", type=int, nargs="+", help="numbers of patches N, squares (default: 16 196)")
    add("--budgets", type=int, nargs="+", help="default: 256 1024 4096 for N ≤ 16, else 512 2048")
    add("--seeds", type=int, help="seeds per run (default: 2 for N ≤ 16, else 1)")
    add("--reference-budget", type=int, default=8192, help="evaluations of the references for N > 16")
    add("--reference-method", default="kernel", choices=["kernel", "leverage", "permutation"])
    add("--methods", nargs="*", help="only these methods (names as listed) and shapkern's")
    add("--batch-size", type=int, help="model rows per forward (256 CPU, 512 CUDA)")
    add("--clock", choices=harness.CLOCKS, default="wall", help="see harness.time_interleaved")
    add("--weights-seed", type=int, default=0)
    add("--image-seed", type=int, default=0, help="the evidence image; with --checkpoint: the test image")
    add("--cache", type=Path, default=harness.RUNS / "peers-cache", help="folder of cached references")
    add("--stem", default="peers", help="results file name")
    add("--render", type=Path, help="only re-write the tables from this results JSON")
    args = parser.parse_args(argv)
    pairs = (item.partition("=") for item in args.model_kwargs)
    args.model_kwargs = {k: int(v) if v.lstrip("-").isdigit() else v for k, _, v in pairs}
    args.batch_size = args.batch_size or (512 if args.device == "cuda" else 256)
    return args


def selected(table: dict[str, Method], names: list[str] | None) -> dict[str, Method]:
    """The methods of ``--methods`` and shapkern's (all of them when ``names`` is None)."""
    if names is None:
        return table
    unknown = set(names) - set(table)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {list(table)}")
    return {k: m for k, m in table.items() if k in names or m.role == "shapkern"}
