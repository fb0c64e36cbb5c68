"""The report of benchmarks/throughput.py: its Markdown table and bar chart, from its result (JSON).

markdown(json.loads(Path("throughput.json").read_text()))  # re-renders a committed result
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import harness

CHECK_IMAGES, GRADIENT_CHECK_IMAGES = 8, 2  # the images the errors are checked on (throughput.py)
PHASES = ("forward", "forward+backward")


def _rate(value: float) -> str:
    """Evaluations per second: whole numbers from 100 on, three significant digits below."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _clock_note(config: dict, env: dict) -> str:
    if config.get("clock", "wall") == "wall":
        return ""
    return f"; time = CPU time of the process on {harness.hardware_name(env)}, not wall time"


def _family(config: dict) -> str:
    return f" ({config['family']})" if "family" in config else ""


def _error(value: float | None) -> str:
    return "—" if value is None else f"{value:.1e}"


def _error_note(result: dict) -> str:
    """What the error columns compare, and the error of timm's own forward in the same dtype."""
    note = (
        "Errors: relative to an fp32 run of the model's own forward with the absent patch tokens removed, "
        f"on the first {CHECK_IMAGES} images (logits) and {GRADIENT_CHECK_IMAGES} images (gradients of "
        "parameters and images); correct = both ≤ "
        f"{result['tolerance']:g}"
    )
    looser = {r["method"]: r["tolerance"] for r in result["methods"] if r["tolerance"] != result["tolerance"]}
    note += "".join(f", {tol:g} for {name}" for name, tol in looser.items()) + "."
    timm_row = next(
        (r for r in result["methods"] if r["method"] == "key mask, SDPA" and "relative_error" in r), None
    )
    if timm_row and result["config"]["dtype"] != "fp32":
        grad_error = _error(timm_row.get("gradient_relative_error"))
        note += (
            f" timm's own key-masked forward in {result['config']['dtype']} (same game, no shapkern code) "
            f"errs by {timm_row['relative_error']:.1e} (logits) and {grad_error} (gradients): the rounding "
            "of the dtype itself."
        )
    return note


def _phase_cells(row: dict, phase: str) -> list[str]:
    """evals/s (min–max ms), × best alternative, fraction of the floor."""
    stats = row.get(phase)
    if stats is None:
        return ["forward only" if row["forward_only"] and phase != "forward" else "—", "", ""]
    ratio = stats.get("vs_best_alternative")
    return [
        f"{_rate(stats['evals_per_s'])} ({stats['min_ms']:,.1f}–{stats['max_ms']:,.1f} ms)",
        "—" if ratio is None else f"×{ratio:.2f}",
        f"{stats['fraction_of_floor']:.0%}",
    ]


def markdown(result: dict) -> str:
    env, config = result["environment"], result["config"]
    phases = [p for p in PHASES if any(p in row for row in result["methods"])] or ["forward"]
    headers = ["method"]
    for phase in phases:
        headers += [f"{phase} evals/s (min–max time)", "× best alt.", "of floor"]
    headers += ["peak MiB", "rel. error", "grad. rel. error", "correct"]
    table = []
    for row in result["methods"]:
        if "unavailable" in row or ("failed" in row and "relative_error" not in row):
            reason = (
                f"unavailable: {row['unavailable']}" if "unavailable" in row else f"failed: {row['failed']}"
            )
            table.append([row["method"], reason])
            continue
        cells = [row["method"]]
        for phase in phases:
            cells += _phase_cells(row, phase)
        peaks = [row[p]["peak_mib"] for p in phases if p in row and row[p]["peak_mib"] is not None]
        cells += [
            f"{max(peaks):,.0f}" if peaks else "—",
            _error(row["relative_error"]),
            _error(row.get("gradient_relative_error")),
            ("yes" if row.get("correct") else "NO")
            + (f" (failed: {row['failed']})" if "failed" in row else ""),
        ]
        table.append(cells)
    best = {
        p: next(
            (r[p]["best_alternative"] for r in result["methods"] if "best_alternative" in r.get(p, {})), None
        )
        for p in phases
    }
    lines = [
        f"# Coalition throughput on {harness.hardware_name(env)}",
        "",
        (
            f"{config['model']}{_family(config)}, {config['dtype']}, {config['images']} images × "
            f"{config['coalitions']} paired coalitions ({config['players']} players); torch {env['torch']}, "
            f"triton {env['triton']}, timm {env['timm']}, {env['date']}, {env['cpu']} "
            f"({env['cpu_threads']} threads). "
            f"Command: `{result['command']}`"
        ),
        "",
        (
            f"Evaluations per second: median of {config['repeats']} rounds, the methods timed round-robin "
            f"within each round (min–max time per call in brackets){_clock_note(config, env)}. "
            "× best alt.: over the fastest correct "
            "method outside shapkern ("
            + "; ".join(f"{p}: {name}" for p, name in best.items() if name)
            + "). Floor: packed FLOPs"
            + (f" ({result['flop_model']})" if "flop_model" in result else "")
            + " at the GEMM rate measured in this run, "
            f"{result['gemm_tflops']:.2f} TFLOP/s = {_rate(result['floor_evals_per_s']['forward'])} "
            "evaluations/s forward, a third of that with backward."
        ),
        "",
        _error_note(result),
        "",
        harness.markdown_table(headers, table),
    ]
    if any(r.get("forward_only") and "forward" in r for r in result["methods"]):
        lines.append(
            "Forward only: fp8 serves the forward-only ℓ_sv targets and has no backward"
            + (
                "; on the CPU it runs torch's reference `_scaled_mm`, for its error, not its speed."
                if env["device"] == "cpu"
                else "."
            )
        )
    return "\n".join(lines)


def bar_chart(result: dict, path: Path):
    """Horizontal bars of evaluations/s per method and phase, the FLOP floors dashed, written to
    ``path``; returns the matplotlib Figure (None when no method ran). The legend sits below the
    axes, where it covers no bar, and a forward-only method says so where its second bar would be."""
    from matplotlib.figure import Figure  # no pyplot state

    rows = [r for r in result["methods"] if "forward" in r]
    phases = [p for p in PHASES if any(p in r for r in rows)]
    if not rows:
        return None
    fig = Figure(figsize=(9, 1.2 + 0.6 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    height = 0.8 / len(phases)
    for i, phase in enumerate(phases):
        values = [r.get(phase, {}).get("evals_per_s", 0) for r in rows]
        ax.barh([j + i * height for j in range(len(rows))], values, height, label=phase)
        ax.axvline(result["floor_evals_per_s"][phase], color=f"C{i}", linestyle="--", linewidth=1)
        for j, row in enumerate(rows):
            if phase not in row and row.get("forward_only"):
                ax.text(0, j + i * height, " forward only", va="center", fontsize=8, color=f"C{i}")
    ax.set_yticks([j + height * (len(phases) - 1) / 2 for j in range(len(rows))], [r["method"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("evaluations / s (dashed: FLOP floor)")
    ax.set_title(f"{result['config']['model']} on {harness.hardware_name(result['environment'])}")
    fig.legend(loc="outside lower center", ncol=len(phases), frameon=False)
    fig.savefig(path, dpi=120)
    return fig
