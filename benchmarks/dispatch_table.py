"""The engine's dispatch table (shapkern/engine/dispatch.py) from throughput runs, each on one device.

    python -m benchmarks.dispatch_table RESULTS/throughput*.json --out RESULTS [--margin 1.05]

For every run (one device, one model, one dtype) and phase, the engine's fixed routes (the throughput
rows of :data:`ROUTE_METHODS`: one block path and one attention each) are compared with the default
route, the one a call takes where the table says nothing (compiled blocks and the varlen attention on
CUDA, plain blocks on the CPU). The fastest route enters the table where it is at least ``--margin``
times the default's evaluations/s in that run, so that timing noise stays out.

Writes, under ``--out``: ``dispatch_table.json`` (the routes, for ``SHAPKERN_DISPATCH_TABLE``),
``dispatch_table.py`` (the same routes as the source of shapkern/engine/dispatch_table.py, to commit
with the results) and ``dispatch_table.md``: per run and phase, the route taken, its speed over the
default and over the best alternative (the fastest correct method outside shapkern), and whether the
engine's path is then at least the best alternative.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from shapkern.engine.dispatch import Route

__all__ = ["ROUTE_METHODS", "main", "markdown", "python_source", "routes_of_run"]

# Throughput rows that run the engine on one fixed route: (block path, attention).
ROUTE_METHODS = {
    "shapkern engine": ("plain", "varlen"),
    "shapkern engine, compiled": ("compiled", "varlen"),
    "shapkern engine, fused kernels": ("fused", "varlen"),
    "shapkern engine, pair attention": ("plain", "pairs"),
    "shapkern engine, compiled, pair attention": ("compiled", "pairs"),
}
PHASES = ("forward", "forward+backward")


def _device_key(environment: dict, source: str) -> str:
    if not environment["device"].startswith("cuda"):
        return "cpu"
    if "capability" not in environment:
        raise ValueError(f"{source}: the run records no compute capability (measured before dispatch tables)")
    return f"cuda:{environment['capability']}"


def _speed(row: dict, phase: str) -> float | None:
    stats = row.get(phase)
    return None if not row.get("correct") or stats is None else stats["evals_per_s"]


def routes_of_run(result: dict, source: str, margin: float) -> tuple[list[Route], list[dict]]:
    """The routes one throughput run puts in the table, and a report row per phase."""
    env, config = result["environment"], result["config"]
    if config.get("engine_family") is None:
        return [], []  # the engine does not run this model: no route to choose
    device = _device_key(env, source)
    default = ("compiled", "varlen") if device != "cpu" else ("plain", "varlen")
    rows = {row["method"]: row for row in result["methods"]}
    routes, report = [], []
    for phase in PHASES:
        speeds = {ROUTE_METHODS[m]: _speed(r, phase) for m, r in rows.items() if m in ROUTE_METHODS}
        speeds = {route: speed for route, speed in speeds.items() if speed is not None}
        alternatives = [(_speed(r, phase), m) for m, r in rows.items() if not r["shapkern"]]
        best_alternative = max((a for a in alternatives if a[0] is not None), default=None)
        if default not in speeds:
            continue  # the default route did not run in this phase: nothing to compare with
        fastest = max(speeds, key=speeds.__getitem__)
        speedup = speeds[fastest] / speeds[default]
        taken = fastest if speedup >= margin else default
        if taken != default:
            routes.append(
                Route(
                    device=device,
                    family=config["engine_family"],
                    phase=phase,
                    dtype=config["compute_dtype"],
                    tokens=int(config["tokens"]),
                    blocks=taken[0],
                    attention=taken[1],
                    speedup=round(speedup, 3),
                    source=f"{source} ({env.get('gpu', env.get('cpu', device))})",
                )
            )
        report.append(
            {
                "source": source,
                "model": config["model"],
                "phase": phase,
                "default": default,
                "taken": taken,
                "speedup": speeds[taken] / speeds[default],
                "best_alternative": None if best_alternative is None else best_alternative[1],
                "vs_best_alternative": None
                if best_alternative is None
                else speeds[taken] / best_alternative[0],
            }
        )
    return routes, report


def python_source(routes: list[Route], sources: list[str]) -> str:
    """shapkern/engine/dispatch_table.py holding ``routes``."""
    lines = [
        '"""The engine\'s measured routes (see :mod:`shapkern.engine.dispatch`), written by',
        "``python -m benchmarks.dispatch_table`` from the throughput runs",
        *(f"{source}," for source in sources[:-1]),
        f"{sources[-1]}." if sources else "(none).",
        '"""',
        "",
        "from shapkern.engine.dispatch import Route",
        "",
        "ROUTES: tuple[Route, ...] = (",
        *(f"    {route!r}," for route in routes),
        ")",
    ]
    return "\n".join(lines) + "\n"


def markdown(routes: list[Route], report: list[dict]) -> str:
    lines = [
        "# The engine's dispatch table",
        "",
        "| run | model | phase | default route | route taken | × default | best alternative | × best alt. |",
        "|---|---|---|---|---|--:|---|--:|",
    ]
    for row in report:
        versus = row["vs_best_alternative"]
        lines.append(
            f"| {row['source']} | {row['model']} | {row['phase']} | {' + '.join(row['default'])} | "
            f"{' + '.join(row['taken'])} | {row['speedup']:.2f} | {row['best_alternative'] or '—'} | "
            + ("—" if versus is None else f"{versus:.2f}" + ("" if versus >= 1 else " (still behind)"))
            + " |"
        )
    lines += ["", f"{len(routes)} route(s) in the table."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[Route]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dispatch_table", description=__doc__)
    parser.add_argument("runs", nargs="+", help="throughput result JSON files (benchmarks.throughput)")
    parser.add_argument("--out", required=True, help="folder for dispatch_table.{json,py,md}")
    parser.add_argument("--margin", type=float, default=1.05, help="a route's least speedup over the default")
    args = parser.parse_args(argv)
    routes, report = [], []
    for path in args.runs:
        run_routes, run_report = routes_of_run(json.loads(Path(path).read_text()), path, args.margin)
        routes += run_routes
        report += run_report
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = {"margin": args.margin, "runs": args.runs, "routes": [dataclasses.asdict(r) for r in routes]}
    (out / "dispatch_table.json").write_text(json.dumps(table, indent=2) + "\n")
    (out / "dispatch_table.py").write_text(python_source(routes, args.runs))
    text = markdown(routes, report)
    (out / "dispatch_table.md").write_text(text)
    print(text)
    return routes


if __name__ == "__main__":
    main()
