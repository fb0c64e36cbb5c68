"""Running the peer study: references (cached), the methods round-robin at each budget, and the
equal-error comparison."""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

import shapkern
from benchmarks import harness
from benchmarks.experiments.peers.case import Case
from benchmarks.experiments.peers.config import EXACT_PLAYERS, REFERENCE_SEED
from benchmarks.experiments.peers.methods import PIXELS, TOKENS, Method, explain, measured
from shapkern.explainers.estimators import bayes


def log(message: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def reference(case: Case, game: str, args) -> dict:
    """Shapley values of the case's game, exact up to EXACT_PLAYERS, else ``--reference-method`` at
    ``--reference-budget``; cached under ``--cache``, keyed by everything that defines them.
    Returns {"values" (N,), "method", "evaluations", "relative_se" (‖SE‖ / ‖φ‖; 0 if exact), ...}."""
    exact = case.players <= EXACT_PLAYERS
    method, budget = ("exact", None) if exact else (args.reference_method, args.reference_budget)
    key = {k: getattr(args, k) for k in ("model", "model_kwargs", "weights_seed", "image_seed")}
    if args.checkpoint:
        key["checkpoint"] = hashlib.sha256(Path(args.checkpoint).read_bytes()).hexdigest()
    key |= {"patch": case.patch, "grid": case.grid, "target": case.target, "game": game + "s"}
    key |= {"method": method, "budget": budget, "device": case.image.device.type}
    key["shapkern"] = shapkern.__version__  # delete the cache after changing the estimators
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(args.cache) / f"reference-{digest}.json"
    if not path.exists():
        log(f"reference: {game} game, {method}, {budget or '2^N'} evaluations")
        start = time.perf_counter()
        mode = "input" if game == PIXELS else None
        att = explain(case, budget, REFERENCE_SEED, method, mode, coalitions_per_call=4096)
        values = att.values[0, :, 0].double().cpu()
        se = 0.0 if exact else float(att.std_error[0, :, 0].double().norm() / values.norm())
        result = {"key": key, "values": values.tolist(), "method": method, "evaluations": att.evaluations}
        harness.write_json(path, result | {"relative_se": se, "seconds": time.perf_counter() - start})
    return json.loads(path.read_text())


def seconds_at_error(runs: list[dict], error: float) -> tuple[str, float]:
    """(relation, seconds) a method needs to reach ``error``, from its runs by increasing budget:
    ("=", log-log interpolation between the last run above and the first at or below it), ("≤",
    its first run's seconds), (">", its last run's seconds) or ("never", inf) when its last budget
    bought no more evaluations than the one before (shap's partition tree, exhausted)."""
    for i, run in enumerate(runs):
        if run["error"] <= error:
            if i == 0 or run["error"] <= 0:
                return "≤", run["seconds"]
            prev = runs[i - 1]
            fraction = math.log(prev["error"] / error) / math.log(prev["error"] / run["error"])
            return "=", prev["seconds"] * (run["seconds"] / prev["seconds"]) ** fraction
    if len(runs) > 1 and runs[-1]["evaluations"] <= runs[-2]["evaluations"]:
        return "never", math.inf
    return ">", runs[-1]["seconds"]


def best_packed(runs: dict[str, list[dict]], table: dict[str, Method]) -> str | None:
    """The shapkern.explain row on the packed engine with the lowest error at its largest budget."""
    rows = [k for k, v in runs.items() if v and table[k].role == "shapkern" and table[k].game == TOKENS]
    return min(rows, key=lambda k: runs[k][-1]["error"], default=None)


def equal_error(runs: dict[str, list[dict]], primary: str | None) -> dict:
    """budget -> method -> {relation, seconds, ratio (its seconds / primary's)} at primary's error."""
    found = {}
    for mine in runs.get(primary, []):
        found[mine["budget"]] = {"target_error": mine["error"], "seconds": mine["seconds"], "methods": {}}
        for name, theirs in runs.items():
            if name != primary and theirs:
                relation, seconds = seconds_at_error(theirs, mine["error"])
                hit = {"relation": relation, "seconds": seconds, "ratio": seconds / mine["seconds"]}
                found[mine["budget"]]["methods"][name] = hit
    return found


def _warm_up(case: Case, table: dict[str, Method], skipped: dict) -> dict[str, str]:
    """One untimed call of every installed method (imports, numba compilation, allocator growth);
    returns name -> failure of those that failed."""
    failed = {}
    for name, method in table.items():
        if name not in skipped:
            try:
                measured(case, method, max(method.min_budget(case.players), 16), 0)
            except Exception as error:  # noqa: BLE001 - reported in the results
                failed[name] = harness.failure(error)
    return failed


def _bayes_designs(n: int, budgets: list[int], seeds: int) -> float:
    """CPU seconds of bayes's greedy designs at every budget and seed (cached in memory, untimed after)."""
    start = time.process_time()
    for budget in budgets:
        for seed in range(seeds):
            if budget >= 2 * n + 2 and (budget - 2) // 2 < (1 << (n - 1)) - 1:
                bayes.greedy_pairs(n, min((budget - 2) // 2, bayes.MAX_PAIRS), seed=seed)
    return time.process_time() - start


def _run_budget(case: Case, table: dict[str, Method], budget: int, seeds: int, refs: dict, state: dict, args):
    """Every active method at ``budget``, all seeds, round-robin: a run appended to state["runs"][name],
    or the failure in state["failed"]."""
    runs, failed, n = state["runs"], state["failed"], case.players
    active = [k for k in runs if k not in failed and budget >= table[k].min_budget(n)]
    out = {}

    def call(name, seed):
        out[name, seed] = measured(case, table[name], budget, seed)

    fns = {(k, s): lambda k=k, s=s: call(k, s) for k in active for s in range(seeds)}
    timing = harness.time_interleaved(
        fns, case.image.device, warmup=0, repeats=1, catch=True, clock=args.clock
    )
    for name in active:
        failures = [timing[name, s]["failed"] for s in range(seeds) if "failed" in timing[name, s]]
        if failures:
            failed[name] = failures[0]
            continue
        ref = refs[table[name].game]
        want = torch.tensor(ref["values"])
        errors = [harness.relative_error(torch.from_numpy(out[name, s][0]), want) for s in range(seeds)]
        raw = math.sqrt(sum(e * e for e in errors) / seeds)
        run = {
            "budget": budget,
            "evaluations": sum(out[name, s][1] for s in range(seeds)) / seeds,
            "seconds": float(np.median([timing[name, s]["median_ms"] / 1e3 for s in range(seeds)])),
            "error": math.sqrt(max(raw * raw - ref["relative_se"] ** 2, 0.0)),
            "raw_error": raw,
            "seed_errors": errors,
        }
        runs[name].append(run)
        log(f"N={n} {name} @{budget}: {run['evaluations']:.0f} evals, {run['seconds']:.2f} s, {raw=:.3f}")


def run_setting(case: Case, table: dict[str, Method], budgets: list[int], seeds: int, args) -> dict:
    """References, warm-ups and bayes designs (untimed), then every budget round-robin."""
    refs = {game: reference(case, game, args) for game in (PIXELS, TOKENS)}
    skipped = {k: f"{m.library} not installed" for k, m in table.items() if not find_spec(m.library)}
    failed = _warm_up(case, table, skipped)
    design = _bayes_designs(case.players, budgets, seeds)
    state = {"runs": {name: [] for name in table if name not in skipped}, "failed": failed}
    for budget in budgets:
        _run_budget(case, table, budget, seeds, refs, state, args)
    runs = {k: v for k, v in state["runs"].items() if k not in failed}
    return {
        "players": case.players,
        "img_size": case.image.shape[-1],
        "patch": case.patch[0],
        "target_class": case.target,
        "budgets": budgets,
        "seeds": seeds,
        "bayes_design_seconds": design,
        "references": {g: {k: v for k, v in r.items() if k != "values"} for g, r in refs.items()},
        "skipped": skipped,
        "failed": failed,
        "runs": runs,
        "primary": best_packed(runs, table),
        "equal_error": equal_error(runs, best_packed(runs, table)),
    }
