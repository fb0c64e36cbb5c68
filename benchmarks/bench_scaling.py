"""Scaling: evaluations per second of the engine and the zero-input baseline as M and N grow.

    python benchmarks/bench_scaling.py [--device cuda|cpu]

M (paired coalitions per image) runs over 8 … 256 at patch 16; N over 49 / 196 / 784 players
(patch 32 / 16 / 8 at 224 px) at M = 32. Forward only. Writes scaling.{json,md} under
benchmarks/results/<date>-<device>/.
"""

import argparse
from pathlib import Path

import common
import run

METHODS = ["shapkern engine", "zero-input full forward"]


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default=common.default_device(), choices=["cuda", "cpu"])
    parser.add_argument("--coalitions", type=int, nargs="+", default=None)
    parser.add_argument("--patch-sizes", type=int, nargs="+", default=[32, 16, 8])
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    coalitions = args.coalitions or ([8, 16, 32, 64, 128, 256] if cuda else [8, 16, 32])
    images = args.images or (8 if cuda else 1)
    common.configure_cpu_threads()
    configs = [(m, 16) for m in coalitions] + [(32, p) for p in args.patch_sizes if p != 16]
    points = []
    for num, patch in configs:
        flags = ["--device", args.device, "--images", str(images), "--coalitions", str(num)]
        flags += ["--patch-size", str(patch), "--no-backward", "--methods", *METHODS]
        result = run.measure(run.parse_args(flags))
        for row in result["methods"]:
            points.append(
                {
                    "method": row["method"],
                    "coalitions": num,
                    "players": result["config"]["players"],
                    "evals_per_s": row["forward"]["evals_per_s"],
                    "correct": row["correct"],
                }
            )
    env = result["environment"]
    lines = [
        f"# Scaling on {common.hardware_name(env)}",
        "",
        (
            f"{result['config']['model']}, {result['config']['dtype']}, {images} images, forward; "
            f"torch {env['torch']}, triton {env['triton']}, {env['date']}."
        ),
        "",
        "| method | M | N | evals/s | correct |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {p['method']} | {p['coalitions']} | {p['players']} | {p['evals_per_s']:,.0f} | {p['correct']} |"
        for p in points
    ]
    out = common.results_dir(args.out, args.device)
    common.write_results(out, "scaling", {"environment": env, "points": points}, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return points


if __name__ == "__main__":
    main()
