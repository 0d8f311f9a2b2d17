"""The ``fsmooth`` command: train, calibrate, plot-log, demo, defend, eval, figures, summarize.

Each subcommand is one module with ``add_parser(subparsers)`` (returns its parser) and
``run(args)`` (returns the exit code), listed in :data:`COMMANDS`. A module that cannot
be imported (an optional dependency missing) still gets a subcommand, which says why.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import logging
import sys

from ._validation import check_device

__all__ = ["main", "build_parser", "COMMANDS"]

# subcommand -> the module that registers and runs it, in the order ``fsmooth --help`` lists them
COMMANDS = {
    "train": "fsmooth.commands.train",
    "calibrate": "fsmooth.commands.calibrate",
    "plot-log": "fsmooth.commands.plot_log",
    "demo": "fsmooth.commands.demo",
    "defend": "fsmooth.commands.defend",
    "eval": "fsmooth.evaluation.cli",
    "figures": "fsmooth.commands.figures",
    "summarize": "fsmooth.commands.summarize",
}


def _unavailable(command: str, module: str, reason: str, args) -> int:
    print(f"fsmooth {command} is unavailable: {module} cannot be imported ({reason})", file=sys.stderr)
    return 2


def _register(subparsers, command: str, module_name: str) -> None:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        p = subparsers.add_parser(command, help=f"(unavailable in this installation: {module_name})")
        p.set_defaults(func=functools.partial(_unavailable, command, module_name, str(exc)))
        _verbose(p)
        return
    parser = module.add_parser(subparsers)
    parser.set_defaults(func=module.run)
    _verbose(parser)


def _verbose(parser: argparse.ArgumentParser, default=argparse.SUPPRESS) -> None:
    """``-v`` on the top parser (default False) and on every subcommand (no default: it does not reset the
    top one), so that it works before or after the subcommand."""
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="log at INFO level")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fsmooth", description="Feature-smoothing training and Active Defense.")
    _verbose(parser, default=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command, module_name in COMMANDS.items():
        _register(sub, command, module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if getattr(args, "device", None) is not None:  # before any work: a missing GPU is a usage error
            check_device(args.device, "--device")
        return int(args.func(args) or 0)
    except (ValueError, OSError) as exc:  # bad input or an unusable path: one line, not a traceback
        print(f"fsmooth {args.command}: error: {exc}", file=sys.stderr)
        return 2
