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

    OMP_NUM_THREADS=1 python -m benchmarks.experiments.peers --device cpu --clock process \\
        --out benchmarks/results/2026-11-26-cpu
    python -m benchmarks.experiments.peers --device cuda --model vit_base_patch16_224 --settings 196 \\
        --reference-budget 100000 --budgets 2048 8192 32768   # the issue's GPU setting
    python -m shapkern train --data evidence --img-size 224 --patch-size 16 --depth 0 \\
        --embed-dim 0 --num-heads 0 --lam 0 --num-coalitions 2 --grad-coalitions 2 --epochs 8 \\
        --max-steps 189 --warmup-epochs 1 --batch-size 32 --limit-test 400 --faith-images 0 \\
        --out runs/peers196/vit_tiny   # vit_tiny from scratch, N = 196, 3 of 8 epochs: 100% on test
    OMP_NUM_THREADS=1 python -m benchmarks.experiments.peers --device cpu --clock process \\
        --checkpoint runs/peers196/vit_tiny/checkpoint.pt --stem peers-trained \\
        --out benchmarks/results/2026-11-26-cpu
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import warnings
from importlib.util import find_spec
from pathlib import Path

from benchmarks import harness
from benchmarks.experiments.peers import config
from benchmarks.experiments.peers.case import Case, build_case, trained_case
from benchmarks.experiments.peers.methods import Method, methods
from benchmarks.experiments.peers.render import markdown
from benchmarks.experiments.peers.runner import best_packed, equal_error, log, run_setting, seconds_at_error

__all__ = ["Case", "Method", "main", "markdown", "methods", "seconds_at_error"]


def rerender(path, table: dict[str, Method]) -> tuple[dict, str]:
    """The payload of a results JSON with its equal-error comparison recomputed, and its Markdown."""
    payload = json.loads(path.read_text())
    for result in payload["settings"]:
        result["primary"] = best_packed(result["runs"], table)
        result["equal_error"] = equal_error(result["runs"], result["primary"])
    return payload, markdown(payload, table, argparse.Namespace(**payload["arguments"]))


def main(argv: list[str] | None = None) -> dict:
    """Run the study (or, with --render, re-write the tables of a results JSON); returns the payload."""
    args = config.parse_args(argv, __doc__)
    harness.configure_cpu_threads()
    warnings.filterwarnings("ignore", message="Not all budget is required")  # shapiq's border trick
    table = config.selected(methods(), args.methods)
    out = harness.results_dir(args.out, args.device)
    if args.render:
        payload, text = rerender(args.render, table)
        harness.write_results(out, args.stem, payload, text)
        return payload
    payload = {
        "environment": harness.environment(args.device),
        "command": harness.command_line(),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "libraries": {lib: importlib.metadata.version(lib) for lib in config.LIBRARIES if find_spec(lib)},
        "settings": [],
    }
    cases = (
        [trained_case(args)] if args.checkpoint else (build_case(args, n) for n in args.settings or [16, 196])
    )
    for case in cases:
        small = case.players <= config.EXACT_PLAYERS
        budgets = sorted(args.budgets or ([256, 1024, 4096] if small else [512, 2048]))
        payload["settings"].append(run_setting(case, table, budgets, args.seeds or (2 if small else 1), args))
        harness.write_results(out, args.stem, payload, markdown(payload, table, args))
    log(f"wrote {out / args.stem}.json and .md")
    return payload
