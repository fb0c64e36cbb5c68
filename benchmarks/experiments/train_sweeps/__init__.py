"""Training sweeps of the loss options: forward-only coalitions and the scale of ℓ_sv.

(1) ``grad``: digits with the stop-gradient ℓ_sv (λ = 0.1, μ = 1, KL, M = 8; the default before
0.2.0) with G ∈ --grad-coalitions of the M coalitions carrying gradients: test accuracy,
‖Φ − φ_exact‖/‖φ_exact‖ against the exact Shapley values of the model's own value function (all 2^N
coalitions, first --exact-images test images), held-out ℓ_sv; ``timing``: the training step
(``Trainer.backward`` + ``step``) of every G on the same batches, interleaved, as a ratio to G = M.
(2) ``lam``: digits, λ ∈ --lams with μ = 1 and each ℓ_sv scale of --lam-scales, classification only
(λ = μ = 0) as the accuracy reference, the raw form at --raw-lams (first seed), the raw form with
ℓ_sv's gradient through its targets (``stop_grad=False``, the default since 0.2.0) at
--gradient-lams, and the experimental normalisers of --variants at --variant-lams (ShapleyLoss's
``sv_scale`` "player" and "centered"). (3) ``evidence``: the same λ with --evidence-scale, and
--gradient-lams, on the evidence data, with the pointing game, AUROC and mIoU of the
self-explanations Φ(x)[:, :, y] against the ground-truth evidence patches. (4) ``fp8``: the
stop-gradient form with G = M/4 and its forward-only ℓ_sv targets in e4m3
(``target_precision="fp8"``) against the same runs in the model's dtype. The error against exact
values is also given with Φ and φ_exact centred over classes (the part that softmax sees). Mean ±
std over seeds everywhere.

Every run is kept in --runs/<name>/result.json with its settings; an invocation with the same settings
reuses it, so the sweeps can be run part by part and the tables assembled by the full command.

    python -m benchmarks.experiments.train_sweeps --variants player centered \\
        --gradient-lams 0.1 1 10 100 --out benchmarks/results/2026-11-26-cpu
    python -m benchmarks.experiments.train_sweeps --parts grad timing --seeds 0   # one part, one seed
"""

from __future__ import annotations

import torch

from benchmarks import harness
from benchmarks.experiments.train_sweeps import config, runner
from benchmarks.experiments.train_sweeps.config import VARIANTS, Run
from benchmarks.experiments.train_sweeps.render import markdown

__all__ = ["VARIANTS", "Run", "main", "markdown"]


def main(argv=None) -> None:
    """Run the parts of the command line and write train_sweeps.{json,md}."""
    args = config.parse_args(argv, __doc__.split("\n\n")[0])
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    parts = runner.run_parts(args)
    result = {
        "environment": harness.environment(args.device),
        "command": harness.command_line(),
        "config": config.recorded(args),
        **parts,
    }
    out = harness.results_dir(args.out, args.device)
    text = markdown(result)
    harness.write_results(out, "train_sweeps", result, text)
    print(text)
    print(f"wrote {out}/train_sweeps.{{json,md}}")
