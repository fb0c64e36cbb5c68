"""The image-text experiment's tables: mean ± std over seeds per setting, the targets, the runs."""

from __future__ import annotations

import statistics

from benchmarks import harness
from benchmarks.experiments.image_text.config import TARGET_POINTING, TARGET_R1_GAP, TARGET_REL_ERR

METRICS = {  # name -> (how to read it from a run's result, format)
    "R@1 i→t": (lambda r: r["test_r1_i2t"], "pct"),
    "R@5 i→t": (lambda r: r["test_r5_i2t"], "pct"),
    "R@1 t→i": (lambda r: r["test_r1_t2i"], "pct"),
    "R@5 t→i": (lambda r: r["test_r5_t2i"], "pct"),
    "‖Φ−φ‖/‖φ‖ own game": (lambda r: r["exact"] and r["exact"]["rel_err_mean"], "num"),
    "cosine game": (lambda r: r["exact"] and r["exact"]["cosine_rel_err_mean"], "num"),
    "pointing Φ": (lambda r: r["localization"]["self"]["pointing"], "num"),
    "pointing Φ, one object": (lambda r: r["localization"]["self"]["pointing_single"], "num"),
    "mIoU Φ": (lambda r: r["localization"]["self"]["miou"], "num"),
    "pointing KernelSHAP": (lambda r: r["localization"][_kernel(r)]["pointing"], "num"),
    "mIoU KernelSHAP": (lambda r: r["localization"][_kernel(r)]["miou"], "num"),
    "train s": (lambda r: r["train_seconds"], "s"),
}


def _kernel(result: dict) -> str:
    return next(k for k in result["localization"] if k.startswith("kernel"))


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(values: list, kind: str) -> str:
    if None in values:
        return "—"
    mean, std = _stats(values)
    if kind == "pct":
        return f"{100 * mean:.1f} ± {100 * std:.1f}%"
    if kind == "s":
        return f"{mean:.0f} ± {std:.0f}"
    return f"{mean:.3f} ± {std:.3f}"


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def targets(groups: dict[str, list[dict]]) -> list[str]:
    """The issue's targets, each with its measured numbers and whether it is met."""
    self_runs, base = groups.get("self-explaining", []), groups.get("contrastive", [])
    if not self_runs or not base:
        return []
    lines = []
    for key, label in (("test_r1_i2t", "image→text"), ("test_r1_t2i", "text→image")):
        gap = _stats([r[key] for r in base])[0] - _stats([r[key] for r in self_runs])[0]
        lines.append(
            f"- recall@1 {label}: contrastive − self-explaining = {100 * gap:+.1f} points "
            f"(target ≤ {100 * TARGET_R1_GAP:.0f}): {_verdict(gap <= TARGET_R1_GAP)}"
        )
    error = _stats([r["exact"]["rel_err_mean"] for r in self_runs])[0]
    verdict = _verdict(error <= TARGET_REL_ERR)
    lines.append(f"- self-explanation error {error:.4f} (target ≤ {TARGET_REL_ERR}): {verdict}")
    pointing = _stats([r["localization"]["self"]["pointing"] for r in self_runs])[0]
    kernel = _stats([r["localization"][_kernel(r)]["pointing"] for r in base])[0]
    met = pointing >= TARGET_POINTING and pointing > kernel
    lines.append(
        f"- pointing game of Φ {pointing:.4f}, {_misses(self_runs, 'self')} (target ≥ {TARGET_POINTING} and "
        f"above KernelSHAP on the contrastive-only model, {kernel:.4f}, {_misses(base, None)}): "
        f"{_verdict(met)}"
    )
    return lines


def _misses(runs: list[dict], method: str | None) -> str:
    """'3 misses in 1,335 captions': the pointing game's misses over all seeds (method None: KernelSHAP)."""
    local = [r["localization"] for r in runs]
    scores = [(x[method or _kernel(r)]["pointing"], x["captions"]) for r, x in zip(runs, local, strict=True)]
    misses = sum(round((1 - score) * captions) for score, captions in scores)
    return f"{misses} misses in {sum(c for _, c in scores):,} captions"


def _run_row(r: dict) -> list:
    exact = r["exact"]
    errors = [f"{exact['rel_err_mean']:.4f}", f"{exact['cosine_rel_err_mean']:.3f}"] if exact else ["—", "—"]
    local = r["localization"]
    return [
        r["setting"],
        r["settings"]["seed"],
        f"{100 * r['test_r1_i2t']:.1f}%",
        f"{100 * r['test_r1_t2i']:.1f}%",
        *errors,
        f"{local['self']['pointing']:.3f}",
        f"{local[_kernel(r)]['pointing']:.3f}",
    ]


def markdown(result: dict) -> str:
    groups: dict[str, list[dict]] = {}
    for run in result["runs"]:
        groups.setdefault(run["setting"], []).append(run)
    rows = [
        [name, f"{len(runs)}"] + [_cell([get(r) for r in runs], kind) for get, kind in METRICS.values()]
        for name, runs in groups.items()
    ]
    table = harness.markdown_table(["setting", "seeds", *METRICS], rows)
    headers = [
        "setting",
        "seed",
        "R@1 i→t",
        "R@1 t→i",
        "error",
        "cosine",
        "pointing Φ",
        "pointing KernelSHAP",
    ]
    per_run = harness.markdown_table(headers, [_run_row(r) for r in result["runs"]])
    env = result["environment"]
    head = [
        "# Image-text matching: self-explaining vs contrastive only (captions, CPU)",
        "",
        f"Command: `{result['command']}`",
        f"Machine: {env['cpu']}, {env['cpu_threads']} thread(s) a run, torch {env['torch']}, {env['date']}.",
        "",
    ]
    return "\n".join([*head, table, "Targets (issue 27):", "", *targets(groups), "", "Runs:", "", per_run])
