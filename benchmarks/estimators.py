"""Shapley estimators against exact values on identical N = 16 games: shapkern's and shapiq's.

Games (``--images`` instances each, one output):
    vit_sv     the digits ShapleyViT with the stop-gradient ℓ_sv (``shapkern train --lam 0.1
               --stop-grad``, the default before 0.2.0: today's default makes v_x nearly additive,
               an easy game), the predicted class's logit on the first test images, v_x(S) = the
               model on the patches in S;
    vit_cls    the same architecture trained for classification only (``--lam 0 --mu 0``);
    quadratic  linear + random pairwise terms (exactly 2-additive);
    mlp        a random 2-layer tanh network of the membership vector (smooth, every order);
    threshold  linear + 12 random threshold games 1[|S ∩ T| >= t], |T| <= 6 (sharp, high order).

Every game is tabulated once (all 2^16 coalitions through the model, cached in ``--cache`` with
its exact Shapley values from ``shapkern.estimate(method="exact")``; 256 random coalitions are
re-evaluated through the model as a check), and every estimator, shapkern's and shapiq's, queries
that table, so model time is excluded and the wall time is the estimator's own. A checkpoint
missing under ``--runs`` is trained with the CLI first (a few minutes each on a CPU):
    shapkern train --out RUNS/vit_sv --lam 0.1 --stop-grad --no-progress --faith-images 0 --heatmap-images 0
    shapkern train --out RUNS/vit_cls --lam 0 --mu 0 --no-progress --faith-images 0 --heatmap-images 0

Estimators, at each budget (evaluations per instance, v(∅) and v(N) counted by both libraries):
shapkern ``bayes``, ``leverage``, ``kernel`` and ``permutation`` through ``shapkern.estimate`` (all
instances of a game in one call; ``method="auto"`` is ``exact`` at N = 16 and ``bayes`` above);
shapiq (if installed) paired KernelSHAP, kADDSHAP (k = 2) and PermutationSamplingSV, one instance
per ``approximate`` call through a ``shapiq.Game`` reading the same table (``normalization_value``
= v(∅), as its own explainers do; Shapley values are unchanged). "evaluations" are the rows each
estimator asked for. Over ``--seeds`` x instances: relative L2 error (mean of ‖φ̂ - φ‖ / ‖φ‖), MSE
over all players, precision@3 (top-3 patches by value), wall ms per instance (shapkern: the call's
time over the instances; ``bayes`` includes its greedy design, computed once per (N, budget,
seed); "design cached" repeats seed 0 with the design cached, as every later call with that seed),
and for shapkern the standard errors' z-RMS (RMS of (φ̂ - φ) / SE; 1 = calibrated).

    OMP_NUM_THREADS=1 python -m benchmarks.estimators --out benchmarks/results/2026-11-26-cpu

Writes estimators.{json,md}. shapiq's cells are cached in ``--cache`` (``--fresh`` recomputes).
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from pathlib import Path

import torch

from benchmarks import cases, harness
from shapkern.coalitions import all_coalitions
from shapkern.explainers import ValueFunction, estimate
from shapkern.explainers.metrics import relative_l2, topk_precision

PLAYERS = 16
GAMES = ("vit_sv", "vit_cls", "quadratic", "mlp", "threshold")
TRAIN_FLAGS = {"vit_sv": ["--lam", "0.1", "--stop-grad"], "vit_cls": ["--lam", "0", "--mu", "0"]}
SHAPKERN = ("bayes", "leverage", "kernel", "permutation")
SHAPIQ = {
    "KernelSHAP (paired)": ("KernelSHAP", {"pairing_trick": True}),
    "kADDSHAP (k = 2)": ("kADDSHAP", {"max_order": 2}),
    "PermutationSamplingSV": ("PermutationSamplingSV", {}),
}
TOP = 3


def coalition_index(z: torch.Tensor) -> torch.Tensor:
    """bool (..., N) -> int64 (...) table index, bit n = player n."""
    return (z.long() << torch.arange(z.shape[-1], device=z.device)).sum(-1)


def table_game(table: torch.Tensor) -> ValueFunction:
    """A game reading v(S) from a table (B, 2^N) float64: bool (B, M, N) -> (B, M, 1)."""
    return ValueFunction(lambda z: table.gather(1, coalition_index(z)).unsqueeze(-1), table.shape[0], PLAYERS)


def checkpoint(name: str, runs: Path) -> Path:
    """``runs/<name>/checkpoint.pt``, trained with the CLI and TRAIN_FLAGS[name] when missing."""
    return cases.trained_checkpoint(runs / name, TRAIN_FLAGS[name])


def model_table(name: str, args) -> torch.Tensor:
    """(B, 2^N) the predicted class's logit on every coalition of the first test images."""
    from shapkern.cli.explain_inputs import load_model
    from shapkern.data import load_dataset
    from shapkern.games import model_game

    model, _ = load_model(str(checkpoint(name, args.runs)), torch.device("cpu"))
    arch = model.arch
    bundle = load_dataset("digits", img_size=arch["img_size"], patch_size=arch["patch_size"])
    images = torch.stack([bundle.test[i][0] for i in range(args.images)])
    game = model_game(model, images)
    if game.players != PLAYERS:
        raise ValueError(f"{name}: the checkpoint has {game.players} patches, the benchmark needs {PLAYERS}")
    with torch.no_grad():
        pred = game(torch.ones(args.images, 1, PLAYERS, dtype=torch.bool))[:, 0].argmax(-1, keepdim=True)
        game = game.select(pred)
        table = torch.cat(
            [
                game(z.expand(args.images, -1, -1))[..., 0].double()
                for z in all_coalitions(PLAYERS, coalitions_per_chunk=4096)
            ],
            1,
        )
        probe = torch.rand(args.images, 256, PLAYERS, generator=torch.Generator().manual_seed(0)) < 0.5
        again = game(probe)[..., 0].double()
    gap = float((again - table.gather(1, coalition_index(probe))).abs().max() / table.abs().max())
    print(f"{name}: table vs model on 256 random coalitions, max rel. gap {gap:.1e}", flush=True)
    if gap > 1e-5:
        raise RuntimeError(f"{name}: the tabulated game differs from the model (gap {gap:.1e})")
    return table


def synthetic_table(name: str, images: int) -> torch.Tensor:
    """(B, 2^N) a synthetic game per instance (see the module docstring)."""
    gen = torch.Generator().manual_seed({"quadratic": 1, "mlp": 2, "threshold": 3}[name])
    z = torch.cat(list(all_coalitions(PLAYERS))).double()
    tables = []
    for _ in range(images):
        lin = torch.randn(PLAYERS, generator=gen, dtype=torch.float64)
        if name == "quadratic":
            pair = torch.randn(PLAYERS, PLAYERS, generator=gen, dtype=torch.float64).triu(1) * 0.3
            v = z @ lin + ((z @ pair) * z).sum(-1)
        elif name == "mlp":
            w1 = torch.randn(PLAYERS, 32, generator=gen, dtype=torch.float64) * 0.6
            c = torch.randn(32, generator=gen, dtype=torch.float64)
            w2 = torch.randn(32, generator=gen, dtype=torch.float64) * 2
            v = torch.tanh((z - 0.5) @ w1 + c) @ w2 + 0.2 * z @ lin
        else:
            v = 0.3 * z @ lin
            for _ in range(12):
                k = int(torch.randint(2, 7, (1,), generator=gen))
                members = torch.randperm(PLAYERS, generator=gen)[:k]
                t = int(torch.randint(1, k + 1, (1,), generator=gen))
                v = v + torch.randn(1, generator=gen, dtype=torch.float64) * (z[:, members].sum(-1) >= t)
        tables.append(v)
    return torch.stack(tables)


def load_game(name: str, args) -> dict:
    """{"table": (B, 2^N), "exact": (B, N)} float64, cached in ``args.cache``."""
    key = {"game": name, "images": args.images}
    if name in TRAIN_FLAGS:
        stat = checkpoint(name, args.runs).stat()
        key.update(checkpoint=str(args.runs / name), mtime=stat.st_mtime, bytes=stat.st_size)
    path = args.cache / f"game-{name}.pt"
    if path.exists():
        cached = torch.load(path)
        if cached["key"] == key:
            return cached
    table = model_table(name, args) if name in TRAIN_FLAGS else synthetic_table(name, args.images)
    exact = estimate(table_game(table), method="exact", target="all", progress=False).values[..., 0].double()
    game = {"key": key, "table": table, "exact": exact}
    args.cache.mkdir(parents=True, exist_ok=True)
    torch.save(game, path)
    return game


def run_shapkern(method: str, table: torch.Tensor, budget: int, seeds: int) -> dict:
    """Every seed once (``bayes``: its greedy design computed on the way), then seed 0 again
    (``bayes``: the design cached, as for every later call with that seed)."""
    phis, ses, ms, evals = [], [], [], set()
    for seed in [*range(seeds), 0]:
        start = time.perf_counter()
        att = estimate(
            table_game(table), method=method, budget=budget, seed=seed, target="all", progress=False
        )
        ms.append(1e3 * (time.perf_counter() - start) / table.shape[0])
        phis.append(att.values[..., 0].double())
        ses.append(att.std_error[..., 0].double())
        evals.add(att.evaluations)
    return {
        "phi": torch.stack(phis[:-1]),
        "se": torch.stack(ses[:-1]),
        "ms": ms[:-1],
        "ms_cached": ms[-1],
        "evaluations": sorted(evals),
    }


def run_shapiq(method: str, table: torch.Tensor, budget: int, seeds: int) -> dict:
    import numpy as np
    import shapiq

    class TableGame(shapiq.Game):
        def __init__(self, values: torch.Tensor):
            self.values, self.calls = values.numpy(), 0
            super().__init__(PLAYERS, normalize=True, normalization_value=float(values[0]))

        def value_function(self, coalitions: np.ndarray) -> np.ndarray:
            self.calls += coalitions.shape[0]
            return self.values[np.asarray(coalitions, dtype=np.int64) @ (1 << np.arange(PLAYERS))]

    name, options = SHAPIQ[method]
    phis, ms, evals = [], [], set()
    for seed in range(seeds):
        rows = []
        for values in table:
            game = TableGame(values)
            approximator = getattr(shapiq, name)(PLAYERS, random_state=seed, **options)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                iv = approximator.approximate(budget, game)
            ms.append(1e3 * (time.perf_counter() - start))
            rows.append(torch.tensor([float(iv[(i,)]) for i in range(PLAYERS)], dtype=torch.float64))
            evals.add(game.calls)
        phis.append(torch.stack(rows))
    return {"phi": torch.stack(phis), "ms": ms, "evaluations": sorted(evals)}


def summarize(cell: dict, exact: torch.Tensor) -> dict:
    """The metrics of one (library, method, game, budget) cell over seeds x instances."""
    phi = cell["phi"]  # (S, B, N)
    flat, ref = phi.flatten(0, 1), exact.expand_as(phi).flatten(0, 1)
    out = {
        "rel_l2": float(relative_l2(flat, ref).mean()),
        "mse": float((phi - exact).square().mean()),
        "p_at_3": float(topk_precision(flat, ref, TOP).mean()),
        "ms_per_instance": sum(cell["ms"]) / len(cell["ms"]),
        "ms_per_instance_cached": cell.get("ms_cached"),
        "evaluations": cell["evaluations"],
        "se_z_rms": None,
    }
    if "se" in cell and out["rel_l2"] > 1e-9:  # an exact estimate has a zero standard error
        out["se_z_rms"] = float(((phi - exact) / cell["se"].clamp_min(1e-300)).square().mean().sqrt())
    return out


def _best_ratios(results: dict, budgets: list[int]) -> list[list[str]]:
    """Per game and budget: the best shapkern error over the best shapiq error, and the methods."""
    rows = []
    for game, cells in results.items():
        row = [game]
        for budget in budgets:
            best = {}
            for lib in ("shapkern", "shapiq"):
                found = [
                    (c["rel_l2"], c["method"]) for c in cells if c["library"] == lib and c["budget"] == budget
                ]
                best[lib] = min(found) if found else None
            if best["shapiq"]:
                ratio = best["shapkern"][0] / best["shapiq"][0]
                row.append(f"{ratio:.2f} ({best['shapkern'][1]} / {best['shapiq'][1]})")
            else:
                row.append(f"— ({best['shapkern'][1]} {best['shapkern'][0]:.3g})")
        rows.append(row)
    return rows


def _game_table(cells: list[dict]) -> str:
    """Every (library, method, budget) cell of one game."""
    rows = [
        [
            c["library"],
            c["method"],
            c["budget"],
            f"{c['rel_l2']:.3g}",
            f"{c['mse']:.2e}",
            f"{c['p_at_3']:.2f}",
            c["ms_per_instance"],
            c["ms_per_instance_cached"],
            ", ".join(map(str, c["evaluations"])),
            None if c["se_z_rms"] is None else f"{c['se_z_rms']:.2f}",
        ]
        for c in cells
    ]
    head = ["library", "method", "budget", "rel. L2", "MSE", "P@3", "ms/instance", "ms, design cached"]
    head += ["evaluations", "SE z-rms"]
    return harness.markdown_table(head, rows, align="llrrrrrrrr")


def markdown(results: dict, env: dict, args, notes: list[str]) -> str:
    budgets = args.budgets
    lines = [
        "# Shapley estimators against exact values (N = 16)",
        "",
        f"{harness.hardware_name(env)}, torch {env['torch']}, shapiq {env.get('shapiq') or 'not installed'}, "
        f"{env['date']}; {args.images} instances x {args.seeds} seeds per cell; wall times on a shared CPU "
        "are indicative.",
        "",
        f"    {harness.command_line()}",
        "",
        *notes,
        "## Best shapkern / best shapiq (relative L2, lower is better)",
        "",
    ]
    headers = ["game", *(f"@{b}" for b in budgets)]
    lines += [harness.markdown_table(headers, _best_ratios(results, budgets)), ""]
    for game, cells in results.items():
        lines += [f"## {game}", "", _game_table(cells), ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = harness.argument_parser(__doc__, device=False)
    parser.add_argument("--games", nargs="+", default=list(GAMES), choices=GAMES)
    parser.add_argument("--budgets", nargs="+", type=int, default=[128, 512, 2048])
    parser.add_argument("--images", type=int, default=8, help="instances per game (test images for the ViTs)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--runs", type=Path, default=harness.ROOT / "runs" / "estimators", help="checkpoints")
    parser.add_argument("--cache", type=Path, default=harness.ROOT / "runs" / "estimators" / "cache")
    parser.add_argument("--fresh", action="store_true", help="recompute shapiq's cached cells")
    parser.add_argument("--no-shapiq", dest="shapiq", action="store_false", help="shapkern only")
    args = parser.parse_args(argv)
    out = harness.results_dir(args.out, "cpu")
    env = harness.environment("cpu")
    notes = []
    if args.shapiq and importlib.util.find_spec("shapiq") is None:
        args.shapiq = False
        notes += [
            "shapiq is not installed (pip install shapiq, or the `bench` extra): its rows are skipped.",
            "",
        ]
    if args.shapiq:
        from importlib.metadata import version

        env["shapiq"] = version("shapiq")
    cache_path = args.cache / "shapiq-cells.pt"
    shapiq_cache = {} if args.fresh or not cache_path.exists() else torch.load(cache_path)
    results = {}
    for name in args.games:
        game = load_game(name, args)
        cells = []
        for budget in args.budgets:
            runs = [("shapkern", m) for m in SHAPKERN] + [("shapiq", m) for m in SHAPIQ if args.shapiq]
            for lib, method in runs:
                if lib == "shapkern":
                    cell = run_shapkern(method, game["table"], budget, args.seeds)
                else:
                    key = (method, name, budget, args.seeds, repr(game["key"]))
                    if key not in shapiq_cache:
                        shapiq_cache[key] = run_shapiq(method, game["table"], budget, args.seeds)
                        args.cache.mkdir(parents=True, exist_ok=True)
                        torch.save(shapiq_cache, cache_path)
                    cell = shapiq_cache[key]
                stats = {"library": lib, "method": method, "budget": budget, **summarize(cell, game["exact"])}
                print(name, lib, method, budget, f"rel. L2 {stats['rel_l2']:.4g}", flush=True)
                cells.append(stats)
        results[name] = cells
    payload = {
        "environment": env,
        "command": harness.command_line(),
        "settings": vars(args),
        "results": results,
    }
    harness.write_results(out, "estimators", payload, markdown(results, env, args, notes))
    print(f"wrote {out / 'estimators.md'}")
    return payload


if __name__ == "__main__":
    harness.configure_cpu_threads()
    main()
