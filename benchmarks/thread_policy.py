"""Training speed at 1 and 2 threads and at the thread policy's choice, on the machine as it is and
with busy processes added (the loaded case).

    python -m benchmarks.thread_policy [--busy 0 1] [--repeats 3] [--limit-train 512] [--out DIR]

Each measurement is a fresh ``shapkern train --epochs 1 --limit-train N`` process (the policy reads
the machine when a run starts), run with --threads 1, --threads 2 and without --threads (the
policy, shapkern/threads.py), round-robin, so that a slow moment of a shared machine lands on every
setting of its round. OMP_NUM_THREADS and MKL_NUM_THREADS are removed from the runs' environment.
``--busy K`` starts K processes that spin on the CPU for the whole measurement, ``--settle`` seconds
before it (the 1-minute load average needs about a minute to show them). Recorded per run: images/s
of training (from metrics.jsonl), the threads the run used, the 1-minute load average at its start
and its training loss, so that the losses of different thread counts can be compared bitwise.
Writes thread_policy.{json,md}.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import harness

SETTINGS = {"--threads 1": ["--threads", "1"], "--threads 2": ["--threads", "2"], "default": []}


def parse_args(argv=None):
    parser = harness.argument_parser(__doc__, device=False)
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="spinning processes, per case")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per case")
    parser.add_argument("--limit-train", type=int, default=512, help="training images of the one epoch")
    parser.add_argument(
        "--settle", type=float, default=60.0, help="seconds between starting spinners and runs"
    )
    return parser.parse_args(argv)


def train_once(flags: list[str], limit_train: int, folder: Path) -> dict:
    """One `shapkern train` epoch in a fresh process: its epoch record, load at start and wall time."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(harness.ROOT), env.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "shapkern", "train", "--epochs", "1", "--limit-train", str(limit_train),
        "--limit-test", "64", "--faith-images", "0", "--heatmap-images", "0", "--no-progress",
        "--overwrite", "--out", str(folder), *flags,
    ]  # fmt: skip
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=harness.ROOT)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    record = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
    return {
        "load": load,
        "wall_s": time.perf_counter() - start,
        "images_per_s": record["images_per_s"],
        "threads": record["threads"],
        "train_loss": record["train_loss"],
    }


def measure_case(busy: int, args) -> dict:
    """Every setting ``args.repeats`` times round-robin, with ``busy`` spinning processes alongside."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        if busy:
            time.sleep(args.settle)
        runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
        with tempfile.TemporaryDirectory() as tmp:
            for round_ in range(args.repeats):
                for name, flags in SETTINGS.items():
                    run = train_once(flags, args.limit_train, Path(tmp))
                    runs[name].append(run)
                    print(f"busy {busy}, round {round_ + 1}, {name}: {json.dumps(run)}", flush=True)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    return {"busy": busy, "runs": runs}


def loss_note(case: dict) -> str:
    """Whether runs at the same thread count had bitwise equal losses, and how far apart the counts are."""
    by_threads: dict[int, set[float]] = {}
    for rows in case["runs"].values():
        for run in rows:
            by_threads.setdefault(run["threads"], set()).add(run["train_loss"])
    same = all(len(losses) == 1 for losses in by_threads.values())
    losses = [loss for values in by_threads.values() for loss in values]
    spread = (max(losses) - min(losses)) / abs(min(losses))
    return (
        f"- {case['busy']} busy: training losses "
        + ("bitwise equal" if same else "NOT bitwise equal")
        + " at the same thread count; "
        + ("the same at every count" if spread == 0 else f"{spread:.1e} apart (relative) between counts")
    )


def _cell(rows: list[dict]) -> str:
    rates = [run["images_per_s"] for run in rows]
    return f"{statistics.median(rates):,.0f} ({min(rates):,.0f}–{max(rates):,.0f})"


def markdown(result: dict) -> str:
    env = result["environment"]
    headers = ["extra busy processes", "1-min load at start", *SETTINGS, "threads the default chose"]
    table = []
    for case in result["cases"]:
        loads = [run["load"] for rows in case["runs"].values() for run in rows]
        chosen = sorted({run["threads"] for run in case["runs"]["default"]})
        cells = [_cell(case["runs"][name]) for name in SETTINGS]
        table.append(
            [case["busy"], f"{min(loads):.1f}–{max(loads):.1f}", *cells, ", ".join(map(str, chosen))]
        )
    notes = [loss_note(case) for case in result["cases"]]
    return "\n".join(
        [
            f"# Thread policy: training images/s on {env['cpu']} ({os.cpu_count()} cores)",
            "",
            f"`{result['command']}`, torch {env['torch']}, {env['time']}. Images/s of training: median of "
            f"{result['repeats']} runs (min–max), `shapkern train --epochs 1 --limit-train "
            f"{result['limit_train']}` on digits, settings round-robin.",
            "",
            harness.markdown_table(headers, table, align="rlrrrr"),
            *notes,
        ]
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = harness.results_dir(args.out, "cpu")
    result = {
        "environment": harness.environment("cpu"),
        "command": harness.command_line(),
        "repeats": args.repeats,
        "limit_train": args.limit_train,
        "cases": [],
    }
    for busy in args.busy:
        result["cases"].append(measure_case(busy, args))
        harness.write_results(out, "thread_policy", result, markdown(result))
    print(markdown(result))
    print(f"wrote {out}/thread_policy.{{json,md}}")
    return result


if __name__ == "__main__":
    main()
