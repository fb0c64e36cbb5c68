"""Image-text matching (issue 27) on the built-in captioned set, on the CPU: a ShapleyCLIP trained
with the contrastive loss alone (λ = μ = 0) and self-explaining (λ ℓ_sv + μ ℓ_mask), every seed.

Per run: retrieval recall@1 and @5 both ways over the 500 test images' retrieval captions (CLIP's
cosine similarity); the error ‖exp(τ)Φ·e/‖f(x)‖ − φ‖/‖φ‖ of its one-pass explanation against the
exact Shapley values (all 2^16 coalitions) of its own game exp(τ)⟨f(x_S), e_t⟩/‖f(x)‖ over each of
the first --exact-images test images' captions (self-explaining runs), and against those of the
cosine game exp(τ) cos(f(x_S), e_t), which normalises every coalition by its own norm;
localisation from the text query (pointing game, AUROC, mIoU against the cells each caption names)
over the captions of the first --local-images test images, by Φ and by post-hoc KernelSHAP at
--kernel-budget evaluations on the same model's game.

Every run is kept in --runs/<name>/result.json with its settings and reused by a later invocation
with the same settings, so seeds can run in separate processes and the tables be assembled after.

    OMP_NUM_THREADS=1 python -m benchmarks.experiments.image_text --device cpu \\
        --out benchmarks/results/2026-12-07-cpu
"""

from __future__ import annotations

import torch

from benchmarks import harness
from benchmarks.experiments.image_text import config, runner
from benchmarks.experiments.image_text.render import markdown

__all__ = ["main", "markdown"]


def main(argv=None) -> None:
    """Train and score every run of the command line; write image_text.{json,md}."""
    args = config.parse_args(argv, __doc__.split("\n\n")[0])
    torch.set_num_threads(args.threads)
    result = {
        "environment": harness.environment(args.device),
        "command": harness.command_line(),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "device")},
        "runs": [runner.train_run(run, args) for run in config.runs(args)],
    }
    out = harness.results_dir(args.out, args.device)
    text = markdown(result)
    harness.write_results(out, "image_text", result, text)
    print(text)
    print(f"wrote {out}/image_text.{{json,md}}")
