"""From runs to rows: mean ± std over seeds of every metric per run group, the choice of G and the
issue's targets."""

from __future__ import annotations

import dataclasses
import math
import statistics

from benchmarks.experiments.train_sweeps.config import TARGET_ACC_GAP, TARGET_REL_ERR, Run


def _stats(values: list[float]) -> dict:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


METRICS = {
    "test_acc": lambda r: r["test_acc"],
    "test_sv": lambda r: r["test_sv"],
    "rel_err": lambda r: r["exact"]["rel_err_mean"] if "exact" in r else None,
    "rel_err_centred": lambda r: r.get("exact", {}).get("rel_err_centred_mean"),  # not in older runs
    "faith_perm_rel_err": lambda r: r["faith_perm_rel_err"],
    "test_logit_sq": lambda r: r.get("test_logit_sq"),
    "test_logit_sq_centered": lambda r: r.get("test_logit_sq_centered"),  # not in older runs
    "pointing": lambda r: r["localization"]["pointing"] if "localization" in r else None,
    "auroc": lambda r: r["localization"]["auroc"] if "localization" in r else None,
    "miou": lambda r: r["localization"]["miou"] if "localization" in r else None,
}


def aggregate(runs: list[tuple[Run, dict]]) -> list[dict]:
    """One row per run group (everything but the seed): mean, std and n of every metric."""
    groups: dict[tuple, list[tuple[Run, dict]]] = {}
    for run, result in runs:
        groups.setdefault(run.group, []).append((run, result))
    rows = []
    for members in groups.values():
        run = members[0][0]
        row = {k: v for k, v in dataclasses.asdict(run).items() if k != "seed"}
        row["seeds"] = [m[0].seed for m in members]
        for key, get in METRICS.items():
            row[key] = _stats([get(result) for _, result in members])
        rows.append(row)
    return rows


def noise_band(a: dict, b: dict) -> float | None:
    """Two standard errors of a difference of two means over seeds (None with fewer than 2 seeds)."""
    if a["std"] is None or b["std"] is None:
        return None
    return 2 * math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])


def find(rows: list[dict], **keys) -> dict | None:
    return next((r for r in rows if all(r[k] == v for k, v in keys.items())), None)


def stop_grad_rows(timing: dict | None) -> dict[int, dict]:
    """G -> the timing row of the stop-gradient step (rows from before the default step have no
    ``stop_grad``)."""
    return {t["grad_coalitions"]: t for t in (timing or {}).get("rows", []) if t.get("stop_grad", True)}


def decide_grad(rows: list[dict], timing: dict | None, full: int) -> dict:
    """The fastest G whose accuracy is not lower and error not higher than G = M's beyond seed noise."""
    base = find(rows, grad_coalitions=full)
    timing_rows = stop_grad_rows(timing)
    verdicts = []
    for row in rows:
        acc_band = noise_band(row["test_acc"], base["test_acc"])
        err_band = noise_band(row["rel_err"], base["rel_err"])
        acc_delta = row["test_acc"]["mean"] - base["test_acc"]["mean"]
        err_delta = (
            row["rel_err"]["mean"] - base["rel_err"]["mean"] if row["rel_err"]["mean"] is not None else None
        )
        ok = (
            acc_band is not None and err_band is not None and acc_delta >= -acc_band and err_delta <= err_band
        )
        g = row["grad_coalitions"]
        verdicts.append(
            {
                "grad_coalitions": g,
                "acc_delta": acc_delta,
                "acc_band": acc_band,
                "err_delta": err_delta,
                "err_band": err_band,
                "within_noise": ok or g == full,
                "step_ratio": timing_rows.get(g, {}).get("ratio_median"),
            }
        )
    passing = [v for v in verdicts if v["within_noise"]]
    best = min(
        passing,
        key=lambda v: (v["step_ratio"] if v["step_ratio"] is not None else 1.0, -v["grad_coalitions"]),
    )
    return {"verdicts": verdicts, "recommended": best["grad_coalitions"]}


def check_targets(rows: list[dict], reference: dict | None, target_lams: list[float]) -> list[dict]:
    """Issue 17's digits targets at each λ of target_lams, per ℓ_sv scale."""
    out = []
    for row in rows:
        if row["lam"] not in target_lams or reference is None:
            continue
        gap = reference["test_acc"]["mean"] - row["test_acc"]["mean"]
        err = row["rel_err"]["mean"]
        out.append(
            {
                "sv_scale": row["sv_scale"],
                "stop_grad": row.get("stop_grad", True),
                "lam": row["lam"],
                "seeds": len(row["seeds"]),
                "acc_gap_points": 100 * gap,
                "rel_err": err,
                "acc_ok": gap <= TARGET_ACC_GAP,
                "err_ok": err is not None and err <= TARGET_REL_ERR,
            }
        )
    return out
