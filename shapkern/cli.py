"""The ``shapkern`` command line: one subcommand per job.

    shapkern train [--data digits] [--model vit_tiny_patch16_224] [--epochs 12] [--lam 1.0] ...

Each subcommand has an ``add_<name>_parser(subparsers)`` that declares its arguments and sets
``func``, the function that runs it with the parsed arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

__all__ = ["add_train_parser", "build_parser", "main"]

# (field of TrainConfig, help). Types and defaults come from TrainConfig.
TRAIN_ARGS = (
    ("data", "digits, evidence or imagefolder:PATH"),
    ("model", "timm ViT architecture (created with pretrained=False)"),
    ("img_size", "input size in pixels"),
    ("patch_size", "patch size in pixels; must divide the image size"),
    (
        "depth",
        (
            "backbone size overrides: the defaults make a 3-block, 64-wide ViT that trains on 2 CPU "
            "cores in minutes; 0 keeps the timm model's own value"
        ),
    ),
    ("embed_dim", "backbone width override (0: the model's own)"),
    ("num_heads", "backbone heads override (0: the model's own)"),
    ("head", "Shapley head: linear, or block (one extra attention block, as in ViT-Shapley)"),
    ("weights", "local file with pretrained backbone weights"),
    ("epochs", "training epochs"),
    ("batch_size", "global batch size (split over torchrun processes)"),
    ("lr", "peak learning rate (AdamW)"),
    ("weight_decay", "AdamW weight decay"),
    ("warmup_epochs", "linear warm-up before the cosine decay"),
    ("clip_grad", "gradient norm clipping (0: off)"),
    ("lam", "λ, weight of the Shapley loss ℓ_sv"),
    ("mu", "μ, weight of the masked-input loss ℓ_mask"),
    ("num_coalitions", "coalitions per image and step (paired, so even)"),
    ("mask_loss", "ℓ_mask: ce, kl or none"),
    ("seed", "random seed (runs are deterministic on CPU)"),
    ("out", "run folder: checkpoint.pt, metrics.jsonl, explanations.png"),
    ("device", "auto, cuda or cpu"),
    ("num_workers", "data loader workers"),
    ("limit_train", "use only the first n training images"),
    ("limit_test", "use only the first n test images"),
    ("faith_images", "test images for the per-epoch faithfulness figure (0: off)"),
    ("heatmap_images", "test images in the explanation grid (0: none)"),
)
OPTIONAL_INT = ("depth", "embed_dim", "num_heads", "limit_train", "limit_test")


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """``shapkern train``: train a self-explaining ViT (design.md §2)."""
    from shapkern.train import TrainConfig

    parser = subparsers.add_parser(
        "train",
        help="train a self-explaining ViT",
        description="Train a self-explaining ViT: Φ(x) per patch, f(x) = Σ Φ, L = ℓ_cls + λ ℓ_sv + μ ℓ_mask. "
        "With no arguments: digits on the CPU in minutes. Multi-process: torchrun --nproc-per-node K "
        "-m shapkern train ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        if field.name not in dict(TRAIN_ARGS):
            continue
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        kind = int if field.name in OPTIONAL_INT else (str if default is None else type(default))
        parser.add_argument(flag, type=kind, default=default, help=dict(TRAIN_ARGS)[field.name])
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument(
        "--no-stop-grad",
        dest="stop_grad",
        action="store_false",
        help="let gradients flow through the ℓ_sv target v_x(S) (ablation)",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    parser.set_defaults(func=run_train)
    return parser


def run_train(args: argparse.Namespace) -> int:
    from shapkern.train import TrainConfig, train

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    for name in ("depth", "embed_dim", "num_heads"):
        if values[name] == 0:
            values[name] = None
    if str(values["mask_loss"]).lower() == "none":
        values["mask_loss"] = None
    train(TrainConfig(**values))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shapkern", description="Fast Shapley values for Vision Transformers: train and explain."
    )
    from shapkern import __version__

    parser.add_argument("--version", action="version", version=f"shapkern {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_train_parser(subparsers)
    from shapkern.explain_cli import add_explain_parser

    add_explain_parser(subparsers)
    # Further subcommands register here, each with its own add_<name>_parser(subparsers).
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``shapkern`` console script and ``python -m shapkern``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:
        print(f"shapkern {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"shapkern {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
