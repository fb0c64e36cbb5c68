"""The ``shapkern`` command line: one module per subcommand, one ``main``.

    shapkern train    train a self-explaining ViT (shapkern.cli.train)
    shapkern explain  Shapley values of a checkpoint's predictions (shapkern.cli.explain)

Each subcommand module has ``add_parser(subparsers)``, which declares its arguments and sets
``func``, the function that runs it with the parsed arguments.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from shapkern import __version__
    from shapkern.cli import explain, train

    parser = argparse.ArgumentParser(
        prog="shapkern", description="Fast Shapley values for Vision Transformers: train and explain."
    )
    parser.add_argument("--version", action="version", version=f"shapkern {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    train.add_parser(subparsers)
    explain.add_parser(subparsers)
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
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:  # CheckpointError is a ValueError
        print(f"shapkern {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"shapkern {args.command}: interrupted", file=sys.stderr)
        return 130
