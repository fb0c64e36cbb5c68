"""The peer study's report: Markdown from its payload (``peers.json``), one section per setting."""

from __future__ import annotations

from benchmarks import harness
from benchmarks.experiments.peers.methods import Method

__all__ = ["markdown"]


def bounded(relation: str, value: float, unit: str = "") -> str:
    """A value with its relation: "≤1.2×", ">3", "4.5"; "never" for a method that cannot get there."""
    return "never" if relation == "never" else f"{relation.replace('=', '')}{value:.3g}{unit}"


def setting_markdown(result: dict, table: dict[str, Method]) -> str:
    n, budgets, side = result["players"], result["budgets"], result["img_size"]
    lines = [f"### N = {n} ({side}×{side} px, {result['patch']}-px patches), class {result['target_class']}"]
    lines.append("")
    for game, ref in result["references"].items():
        what = f"shapkern {ref['method']}, {ref['evaluations']:,} evaluations"
        if ref["method"] != "exact":
            what += f", relative SE {ref['relative_se']:.3f} (subtracted from the errors)"
        lines.append(f"- reference, {game} game: {what}")
    lines += [f"- {why}: {name}" for name, why in {**result["skipped"], **result["failed"]}.items()]
    design = result["bayes_design_seconds"]
    lines += [f"- bayes's greedy designs (once per N, budget and seed; untimed): {design:.1f} s in all", ""]
    lines += [f"(a) Equal evaluations ({result['seeds']} seed(s); error: RMS over seeds):", ""]
    headers = ["method", "game", "estimand"] + [f"{h} @{b}" for b in budgets for h in ("evals", "s", "error")]
    rows = []
    for name, runs in result["runs"].items():
        at = {r["budget"]: r for r in runs}
        cells = [name, table[name].game, table[name].estimand]
        for b in budgets:
            cells += [at[b]["evaluations"], at[b]["seconds"], at[b]["error"]] if b in at else [None] * 3
        rows.append(cells)
    lines.append(harness.markdown_table(headers, rows, align="lll" + "rrr" * len(budgets)))
    found = result["equal_error"]
    primary = result["primary"]
    lines += [f"(b) Equal error: seconds to reach the error of {primary} (the packed row with the lowest"]
    lines += ["error at the largest budget) at each budget, and × its seconds:", ""]
    headers = ["method"]
    for b, v in found.items():
        headers += [f"s @{b} (error {v['target_error']:.3f})", f"× {v['seconds']:.3g} s"]
    rows, shown = [], (("seconds", ""), ("ratio", "×"))
    for name in result["runs"]:
        if name != primary:
            hits = [v["methods"][name] for v in found.values()]
            rows.append([name, *(bounded(h["relation"], h[k], u) for h in hits for k, u in shown)])
    lines.append(harness.markdown_table(headers, rows, align="l" + "rr" * len(found)))
    return "\n".join(lines + [verdict(result, table), ""])


def verdict(result: dict, table: dict[str, Method]) -> str:
    """The issue's target at each budget: shapkern.explain ≥ 2× faster than every peer at equal error
    (met, not met, or undecided where a bound leaves it open)."""
    lines = []
    for budget, found in result["equal_error"].items():
        peers = {k: v for k, v in found["methods"].items() if table[k].role == "peer"}
        ratios = ", ".join(f"{k} {bounded(v['relation'], v['ratio'], '×')}" for k, v in peers.items())
        below = [v for v in peers.values() if v["ratio"] < 2 and v["relation"] in ("=", "≤")]
        open_ = [v for v in peers.values() if (v["relation"], v["ratio"] < 2) in ((">", True), ("≤", False))]
        outcome = "not met" if below else "undecided" if open_ else "met" if peers else "no peer ran"
        lines.append(
            f"- @{budget} (error {found['target_error']:.3f}): {ratios or '—'}; target ≥ 2×: {outcome}"
        )
    header = f"Target at N = {result['players']} (peers' seconds at equal error / shapkern's):\n\n"
    return header + "\n".join(lines)


def markdown(payload: dict, table: dict[str, Method], args) -> str:
    env = payload["environment"]
    clock = "CPU time of the process (OMP_NUM_THREADS=1)" if args.clock == "process" else "wall time"
    libraries = ", ".join(f"{lib} {v}" for lib, v in payload["libraries"].items())
    model = f"{args.model} {args.model_kwargs or ''}".strip() + f", random weights (seed {args.weights_seed})"
    image = "procedural evidence"
    if getattr(args, "checkpoint", None):  # absent from results written before --checkpoint
        model = f"the ShapleyViT of {args.checkpoint} (trained; the peers explain its f(x) = Σ Φ)"
        image = "test"
    text = f"""# Peer libraries against shapkern.explain: one image

`{payload["command"]}`

{harness.hardware_name(env)}, torch {env["torch"]}, shapkern {env["shapkern"]}, {libraries}, {env["date"]}.
Model: {model}, float32, one {image} image (seed {args.image_seed}), its predicted class;
{args.batch_size} model rows per forward for every peer. Seconds: {clock}, one run per (method,
budget, seed), methods round-robin. Evaluations: model rows each run evaluated, v(∅) and v(N) included.

Games: the peers zero the pixels of absent patches and run the whole model (pixel game);
shapkern.explain on a timm ViT drops their tokens (token game, its default; mode='input' computes
the pixel game). Each error is relative L2 against the reference of the method's own game. shap's
Image masker follows its partition tree (Owen values), so its error has a floor. Equal error:
seconds interpolated log-log between a method's two budgets around the target; ≤ / >: the target
lies outside its budgets (bounds). × above 1: shapkern.explain is faster.
"""
    return "\n".join([text] + [setting_markdown(r, table) for r in payload["settings"]])
