"""The ``shapkern`` command line: one module per subcommand, one ``main``.

    shapkern train    train a self-explaining ViT (shapkern.cli.train)
    shapkern explain  Shapley values of a model's predictions, for images or a dataset (shapkern.cli.explain)

Each subcommand module has ``add_parser(subparsers)``, which declares its arguments and sets
``func``, the function that runs it with the parsed arguments.

Errors the user can act on print ``shapkern <command>: error: <message>`` and exit with 2: bad
input (ValueError, a damaged checkpoint included), the file system (OSError: a missing file, a full
disk, a read-only or busy output folder), a diverged run (FloatingPointError). An unknown flag is
reported with the subcommand's usage.
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
    for command in (train, explain):
        sub = command.add_parser(subparsers)
        sub.set_defaults(command_parser=sub)  # reports unknown flags with its own usage
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``shapkern`` console script and ``python -m shapkern``."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "func", None) is None:
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        parser.print_help()
        return 2
    if unknown:
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args)
    except (ValueError, OSError, NotImplementedError, FloatingPointError) as exc:  # see the module docstring
        print(f"shapkern {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"shapkern {args.command}: interrupted", file=sys.stderr)
        return 130
