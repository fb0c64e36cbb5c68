"""Scaling: evaluations per second of the engine and the zero-input baseline as M and N grow.

    python -m benchmarks.bench_scaling [--device cuda|cpu] [--out DIR]

M (paired coalitions per image) runs over 8 … 256 (CUDA) or 8 … 32 (CPU) at patch 16; N over
49 / 196 / 784 players (patch 32 / 16 / 8 at 224 px) at M = 32. Forward only, the methods timed
round-robin at each point (benchmarks/harness.py). Writes scaling.{json,md}.
"""

from benchmarks import harness, throughput

METHODS = ["shapkern engine", "zero-input full forward"]


def main(argv=None) -> list:
    parser = harness.argument_parser(__doc__)
    parser.add_argument(
        "--coalitions", type=int, nargs="+", help="values of M (default: per device, see above)"
    )
    parser.add_argument(
        "--patch-sizes", type=int, nargs="+", default=[32, 16, 8], help="values of the patch size"
    )
    parser.add_argument("--images", type=int, help="images per batch (default: 8 on CUDA, 1 on the CPU)")
    parser.add_argument("--repeats", type=int, help="timed rounds (default: throughput.py's per device)")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    coalitions = args.coalitions or ([8, 16, 32, 64, 128, 256] if cuda else [8, 16, 32])
    images = args.images or (8 if cuda else 1)
    harness.configure_cpu_threads()
    configs = [(m, 16) for m in coalitions] + [(32, p) for p in args.patch_sizes if p != 16]
    points = []
    for num, patch in configs:
        flags = ["--device", args.device, "--images", str(images), "--coalitions", str(num)]
        flags += ["--patch-size", str(patch), "--no-backward", "--methods", *METHODS]
        flags += ["--repeats", str(args.repeats)] if args.repeats else []
        result = throughput.measure(throughput.parse_args(flags))
        for row in result["methods"]:
            points.append(
                {
                    "method": row["method"],
                    "coalitions": num,
                    "players": result["config"]["players"],
                    "evals_per_s": row.get("forward", {}).get("evals_per_s"),
                    "correct": row.get("correct"),
                    **({"failed": row["failed"]} if "failed" in row else {}),
                }
            )
    env, config = result["environment"], result["config"]
    table = [
        [p["method"], p["coalitions"], p["players"], p["evals_per_s"], "yes" if p["correct"] else "NO"]
        for p in points
    ]
    lines = [
        f"# Scaling on {harness.hardware_name(env)}",
        "",
        (
            f"{config['model']}, {config['dtype']}, {images} images, forward, median of {config['repeats']} "
            f"interleaved rounds; torch {env['torch']}, triton {env['triton']}, {env['date']}. "
            f"Command: `{harness.command_line()}`"
        ),
        "",
        harness.markdown_table(["method", "M", "N", "evals/s", "correct"], table, align="lrrrl"),
    ]
    out = harness.results_dir(args.out, args.device)
    markdown = "\n".join(lines)
    harness.write_results(out, "scaling", {"environment": env, "config": config, "points": points}, markdown)
    print(markdown)
    return points


if __name__ == "__main__":
    main()
