"""What the image-text experiment runs: the targets, one run's settings and the command line."""

from __future__ import annotations

import dataclasses

from benchmarks import harness
from shapkern.training.config import TASK_DEFAULTS

DEFAULTS = TASK_DEFAULTS["image-text"]
TARGET_R1_GAP = 0.02  # issue 27: recall@1 within 2 points of the contrastive loss alone
TARGET_REL_ERR = 0.05  # ‖Φ − φ_exact‖/‖φ_exact‖ of its own similarity game
TARGET_POINTING = 0.9  # and above post-hoc KernelSHAP at 512 evaluations on the contrastive-only model


@dataclasses.dataclass(frozen=True)
class Run:
    lam: float
    mu: float
    seed: int

    @property
    def setting(self) -> str:
        return "contrastive" if self.lam == 0 and self.mu == 0 else "self-explaining"

    @property
    def name(self) -> str:
        return f"captions-lam{self.lam:g}-mu{self.mu:g}-s{self.seed}"


def parse_args(argv, description: str):
    parser = harness.argument_parser(description)
    parser.prog = f"python -m {__package__}"
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of every setting")
    parser.add_argument(
        "--settings", nargs="+", default=["contrastive", "self"], choices=["contrastive", "self"]
    )
    parser.add_argument("--lam", type=float, default=DEFAULTS["lam"], help="λ of the self-explaining runs")
    parser.add_argument("--mu", type=float, default=DEFAULTS["mu"], help="μ of the self-explaining runs")
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="training epochs")
    parser.add_argument("--exact-images", type=int, default=8, help="test images scored against exact values")
    parser.add_argument("--local-images", type=int, default=100, help="test images whose captions localise")
    parser.add_argument("--kernel-budget", type=int, default=512, help="KernelSHAP evaluations per image")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--runs", default="runs/image_text", help="folder of the training runs (reused)")
    parser.add_argument("--limit-train", type=int, help="first n training images (smoke runs)")
    parser.add_argument("--limit-test", type=int, help="first n test images (smoke runs)")
    return parser.parse_args(argv)


def runs(args) -> list[Run]:
    out = []
    for setting in args.settings:
        lam, mu = (0.0, 0.0) if setting == "contrastive" else (args.lam, args.mu)
        out += [Run(lam, mu, seed) for seed in args.seeds]
    return out
