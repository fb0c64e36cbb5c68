"""Explaining one ViT image with each peer library, as its users call it, against ``shapkern.explain``.

Peers (players: the model's patches; every peer gets ``--batch-size`` model rows per forward):
- Captum ``KernelShap`` and ``ShapleyValueSampling``, zero baseline, a patch ``feature_mask`` and
  ``perturbations_per_eval``;
- shap's ``Explainer`` with a ``shap.maskers.Image`` masker (its default, the partition algorithm)
  on the patch grid: the model function zeroes the pixels of the masked patches;
- shapiq ``KernelSHAP`` (paired) on a batched pixel-masking ``shapiq.Game`` as its users write one,
  and on shapkern's engine (``shapkern.integrations.shapiq.ShapkernGame``);
- ``shapkern.explain`` with ``bayes`` (what ``method="auto"`` picks for N > 16) and ``kernel`` on the
  packed engine, and ``bayes`` with ``mode="input"`` (pixel masking).

Two games. The peers zero the pixels of absent patches and run the whole model (the *pixel game*);
``shapkern.explain`` on a timm ViT drops their tokens (the *token game*, docs/design.md "The
game"), a different value function with different Shapley values. Each error is the relative L2
distance to the reference of the method's own game: exact (all 2^N coalitions through shapkern) up
to N = 16, else ``--reference-method`` at ``--reference-budget`` evaluations (its relative standard
error f is its noise floor; the errors then subtract it, sqrt(max(e² - f², 0)), since an
independent reference adds f² to the expected squared error). shap's partition explainer
estimates Owen values of its split tree, not Shapley values: its error has a floor.

(a) Equal evaluations: every method at each of ``--budgets`` (``--seeds`` seeds each; error: RMS
over seeds, seconds: median). Evaluations are the model rows each run evaluated (counted at the
model's forward for the peers), v(∅) and v(N) included. Each (method, budget, seed) runs once, the
methods round-robin at each budget, after one untimed warm-up call each; ``bayes``'s greedy design
(computed once per N, budget and seed and cached in memory, so paid once per dataset) is built
untimed and its seconds reported. (b) Equal error: the target is the error of the packed
``shapkern.explain`` row with the lowest error at the largest budget, at each budget; the seconds
each other method needs to reach it are interpolated log-log between its two runs around it (≤:
its smallest budget already reaches it, an upper bound; >: its largest does not, a lower bound;
never: more budget bought no evaluations) and divided by shapkern's seconds. ``--render`` rewrites
the tables from a results JSON without running anything.

The model has random weights (timm's initialisation, ``--weights-seed``; nothing is downloaded)
and the image is one procedural ``evidence`` image; or, with ``--checkpoint``, the model is a
ShapleyViT trained by ``shapkern train`` (the peers call its f(x) = Σ Φ) and the image a test
image of its dataset. The target is the model's predicted class; float32.

    OMP_NUM_THREADS=1 python benchmarks/peers.py --device cpu --clock process \\
        --out benchmarks/results/2026-11-26-cpu
    python benchmarks/peers.py --device cuda --model vit_base_patch16_224 --settings 196 \\
        --reference-budget 100000 --budgets 2048 8192 32768   # the issue's GPU setting
    python -m shapkern train --data evidence --img-size 224 --patch-size 16 --depth 0 \\
        --embed-dim 0 --num-heads 0 --lam 0 --num-coalitions 2 --grad-coalitions 2 --epochs 8 \\
        --max-steps 189 --warmup-epochs 1 --batch-size 32 --limit-test 400 --faith-images 0 \\
        --out runs/peers196/vit_tiny   # vit_tiny from scratch, N = 196, 3 of 8 epochs: 100% on test
    OMP_NUM_THREADS=1 python benchmarks/peers.py --device cpu --clock process \\
        --checkpoint runs/peers196/vit_tiny/checkpoint.pt --stem peers-trained \\
        --out benchmarks/results/2026-11-26-cpu
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import harness
import numpy as np
import torch
from torch import nn

import shapkern
from shapkern.data.synthetic import make_evidence
from shapkern.explainers.estimators import bayes

PIXELS, TOKENS = "pixel", "token"
EXACT_PLAYERS = 16  # references enumerate all 2^N coalitions up to here
REFERENCE_SEED = 12345  # distinct from the runs' seeds (0, 1, ...)
LIBRARIES = ("captum", "shap", "shapiq")


def log(message: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the problem: one model, one image, one class ---------------------------------------------


@dataclass
class Case:
    """One image (1, C, H, W) explained for class ``target`` of ``model`` on a ``grid`` of patches
    of ``patch`` pixels; ``evaluations`` counts the model rows run so far."""

    model: nn.Module
    image: torch.Tensor
    target: int
    grid: tuple[int, int]
    patch: tuple[int, int]
    batch_size: int
    evaluations: int = 0

    @property
    def players(self) -> int:
        return self.grid[0] * self.grid[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The model on (M, C, H, W) images, counted: (M, K) logits (a ShapleyViT's f(x))."""
        self.evaluations += images.shape[0]
        out = self.model(images)
        return out.logits if isinstance(out, shapkern.ShapleyOutput) else out

    def upsample(self, grid: torch.Tensor) -> torch.Tensor:
        """(M, rows, cols) per patch -> (M, 1, H, W) per pixel."""
        return grid.repeat_interleave(self.patch[0], 1).repeat_interleave(self.patch[1], 2).unsqueeze(1)

    def pixel_values(self, keep: torch.Tensor) -> np.ndarray:
        """The target's logit with the absent patches' pixels zeroed: bool (M, rows, cols) -> (M,)."""
        keep = keep.to(self.image.device)
        with torch.no_grad():
            out = [
                self.forward(self.image * self.upsample(k))[:, self.target]
                for k in keep.split(self.batch_size)
            ]
        return torch.cat(out).double().cpu().numpy()


def build_case(args, players: int) -> Case:
    """The random-weight model at the setting's image size, the evidence image and its target."""
    import timm

    side = math.isqrt(players)
    if side * side != players:
        raise SystemExit(f"--settings takes square numbers of patches, got {players}")
    torch.manual_seed(args.weights_seed)
    patch = args.patch_size or timm.create_model(args.model, **args.model_kwargs).patch_embed.patch_size[0]
    torch.manual_seed(args.weights_seed)
    model = timm.create_model(args.model, **args.model_kwargs, img_size=side * patch, patch_size=patch)
    model = model.eval().to(args.device)
    image = make_evidence(1, img_size=side * patch, seed=args.image_seed).images[:1].to(args.device)
    with torch.no_grad():
        target = int(model(image).argmax())
    return Case(model, image, target, (side, side), (patch, patch), args.batch_size)


def trained_case(args) -> Case:
    """The ``--checkpoint``'s ShapleyViT, the ``--image-seed``-th test image of its dataset and the
    model's predicted class."""
    from shapkern.cli.explain import load_model
    from shapkern.data import Preprocessing, load_dataset

    model, data = load_model(str(args.checkpoint), torch.device(args.device))
    arch, players = model.arch, model.num_players
    if args.settings not in (None, [players]):
        raise SystemExit(f"{args.checkpoint} has {players} patches; --settings cannot be {args.settings}")
    prep = Preprocessing.from_dict(data["preprocessing"])
    sizes = {"img_size": arch["img_size"], "patch_size": arch["patch_size"]}
    bundle = load_dataset(data["name"], **sizes, mean=prep.mean, std=prep.std)
    image = bundle.test[args.image_seed][0].unsqueeze(0).to(args.device)
    with torch.no_grad():
        target = int(model(image).logits.argmax())
    side, patch = math.isqrt(players), arch["patch_size"]
    return Case(model.eval(), image, target, (side, side), (patch, patch), args.batch_size)


# -- the methods: (case, budget, seed) -> values (N,); evaluations counted in case ----------------


def captum(case: Case, budget: int, seed: int, algorithm: str):
    import captum.attr

    torch.manual_seed(seed)  # Captum samples from torch's global generator
    ids = torch.arange(case.players, device=case.image.device).view(1, *case.grid)
    samples = budget if algorithm == "KernelShap" else max(1, (budget - 1) // case.players)  # permutations
    attr = getattr(captum.attr, algorithm)(case.forward).attribute(
        case.image,
        baselines=0.0,
        target=case.target,
        feature_mask=case.upsample(ids),  # (1, 1, H, W): the patch index of every pixel
        n_samples=samples,
        perturbations_per_eval=case.batch_size,
    )
    return attr[0, 0, :: case.patch[0], :: case.patch[1]]  # one pixel per patch


def shap_partition(case: Case, budget: int, seed: int):
    """The patch grid as a (rows, cols, 1) image of ones; the masker sets absent patches to 0."""
    import shap

    np.random.seed(seed)
    masker = shap.maskers.Image(0.0, shape=(*case.grid, 1))
    explainer = shap.Explainer(lambda grid: case.pixel_values(torch.from_numpy(grid[..., 0] > 0.5)), masker)
    grid = np.ones((1, *case.grid, 1), dtype=np.float32)
    return explainer(grid, max_evals=budget, batch_size=case.batch_size, silent=True).values[0, ..., 0]


def shapiq_kernel(case: Case, budget: int, seed: int, game: str):
    import shapiq

    if game == TOKENS:
        from shapkern.integrations.shapiq import ShapkernGame

        played = ShapkernGame(case.model, case.image[0], target=case.target, batch_size=case.batch_size)
    else:

        class PixelGame(shapiq.Game):  # a batched image game, as shapiq's users write one
            def value_function(self, coalitions: np.ndarray) -> np.ndarray:
                return case.pixel_values(torch.from_numpy(coalitions.astype(bool)).view(-1, *case.grid))

        empty = PixelGame(case.players, normalize=False).value_function(np.zeros((1, case.players), bool))
        played = PixelGame(case.players, normalization_value=float(empty[0]))
    values = shapiq.KernelSHAP(case.players, pairing_trick=True, random_state=seed).approximate(
        budget, played
    )
    case.evaluations += getattr(played, "evaluations", 0)  # ShapkernGame counts its engine's rows
    return values.get_n_order_values(1)


def explain(case: Case, budget: int | None, seed: int, method: str, mode: str | None, **options):
    """``shapkern.explain`` on the case: an Attribution, its evaluations counted."""
    kw = {"method": method, "budget": budget, "target": case.target, "seed": seed, "mode": mode}
    att = shapkern.explain(case.model, case.image, **kw, progress=False, **options)
    case.evaluations += att.evaluations
    return att


@dataclass(frozen=True)
class Method:
    """``run`` (case, budget, seed) -> values; ``min_budget`` N -> its smallest budget; ``role``:
    ``peer`` (a library as its users call it), ``integration`` or ``shapkern``."""

    run: Callable
    library: str
    game: str
    role: str = "peer"
    min_budget: Callable[[int], int] = lambda n: 8
    estimand: str = "Shapley"


def methods() -> dict[str, Method]:
    def bind(fn, **kw):
        return lambda case, budget, seed: fn(case, budget, seed, **kw)

    def pairs(n):  # bayes: v(∅), v(N) and N complementary pairs
        return 2 * n + 2

    kernel_shap, sampling = (bind(captum, algorithm=a) for a in ("KernelShap", "ShapleyValueSampling"))
    iq_pixels, iq_tokens = (bind(shapiq_kernel, game=g) for g in (PIXELS, TOKENS))
    ours = {
        (m, g): bind(explain, method=m, mode=None if g == TOKENS else "input")
        for m in ("bayes", "kernel")
        for g in (PIXELS, TOKENS)
    }
    return {
        "Captum KernelShap": Method(kernel_shap, "captum", PIXELS),
        "Captum ShapleyValueSampling": Method(sampling, "captum", PIXELS, min_budget=lambda n: n + 1),
        "shap Explainer, Image masker": Method(shap_partition, "shap", PIXELS, estimand="Owen (split tree)"),
        "shapiq KernelSHAP, pixel game": Method(iq_pixels, "shapiq", PIXELS),
        "shapiq KernelSHAP on ShapkernGame": Method(iq_tokens, "shapiq", TOKENS, "integration"),
        "shapkern.explain bayes, packed": Method(
            ours["bayes", TOKENS], "shapkern", TOKENS, "shapkern", pairs
        ),
        "shapkern.explain kernel, packed": Method(ours["kernel", TOKENS], "shapkern", TOKENS, "shapkern"),
        "shapkern.explain bayes, mode='input'": Method(
            ours["bayes", PIXELS], "shapkern", PIXELS, "shapkern", pairs
        ),
    }


def measured(case: Case, method: Method, budget: int, seed: int) -> tuple[np.ndarray, int]:
    """values (N,) float64 and the evaluations of one run."""
    start = case.evaluations
    with torch.no_grad():
        values = method.run(case, budget, seed)
    if isinstance(values, shapkern.Attribution):
        values = values.values  # (1, N, 1)
    if torch.is_tensor(values):
        values = values.detach().double().cpu().numpy()
    return np.asarray(values, dtype=np.float64).reshape(case.players), case.evaluations - start


# -- references and runs ------------------------------------------------------------------------


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
        att = explain(case, budget, REFERENCE_SEED, method, mode, batch_size=4096)
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


def run_setting(case: Case, table: dict[str, Method], budgets: list[int], seeds: int, args) -> dict:
    """References, warm-ups and bayes designs (untimed), then every budget round-robin."""
    refs = {game: reference(case, game, args) for game in (PIXELS, TOKENS)}
    n = case.players
    skipped = {k: f"{m.library} not installed" for k, m in table.items() if not find_spec(m.library)}
    failed: dict[str, str] = {}
    for name, method in table.items():  # imports, numba compilation, allocator growth
        if name not in skipped:
            try:
                measured(case, method, max(method.min_budget(n), 16), 0)
            except Exception as error:  # noqa: BLE001 - reported in the results
                failed[name] = harness.failure(error)
    design = time.process_time()
    for budget in budgets:
        for seed in range(seeds):
            if budget >= 2 * n + 2 and (budget - 2) // 2 < (1 << (n - 1)) - 1:
                bayes.greedy_pairs(n, min((budget - 2) // 2, bayes.MAX_PAIRS), seed=seed)
    design = time.process_time() - design
    runs: dict[str, list[dict]] = {name: [] for name in table if name not in skipped}
    for budget in budgets:
        active = [k for k in runs if k not in failed and budget >= table[k].min_budget(n)]
        out = {}

        def call(name, seed, budget=budget, out=out):
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
    runs = {k: v for k, v in runs.items() if k not in failed}
    return {
        "players": n,
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


# -- the report ---------------------------------------------------------------------------------


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


# -- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = harness.argument_parser(__doc__)
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
    harness.configure_cpu_threads()
    warnings.filterwarnings("ignore", message="Not all budget is required")  # shapiq's border trick
    table = methods()
    if args.methods is not None:
        unknown = set(args.methods) - set(table)
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {list(table)}")
        table = {k: m for k, m in table.items() if k in args.methods or m.role == "shapkern"}
    out = harness.results_dir(args.out, args.device)
    if args.render:
        payload = json.loads(args.render.read_text())
        for result in payload["settings"]:
            result["primary"] = best_packed(result["runs"], table)
            result["equal_error"] = equal_error(result["runs"], result["primary"])
        saved = argparse.Namespace(**payload["arguments"])
        harness.write_results(out, args.stem, payload, markdown(payload, table, saved))
        return payload
    payload = {
        "environment": harness.environment(args.device),
        "command": harness.command_line(),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "libraries": {lib: importlib.metadata.version(lib) for lib in LIBRARIES if find_spec(lib)},
        "settings": [],
    }
    cases = (
        [trained_case(args)] if args.checkpoint else (build_case(args, n) for n in args.settings or [16, 196])
    )
    for case in cases:
        small = case.players <= EXACT_PLAYERS
        budgets = sorted(args.budgets or ([256, 1024, 4096] if small else [512, 2048]))
        payload["settings"].append(run_setting(case, table, budgets, args.seeds or (2 if small else 1), args))
        harness.write_results(out, args.stem, payload, markdown(payload, table, args))
    log(f"wrote {out / args.stem}.json and .md")
    return payload


if __name__ == "__main__":
    main()
