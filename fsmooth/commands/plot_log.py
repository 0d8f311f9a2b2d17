"""``fsmooth plot-log``: training curves (accuracy and feature loss per epoch) of one or more runs."""
from __future__ import annotations

import argparse

from ..figures import plot_logs

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plot-log", help="plot a training log (accuracy and feature loss per epoch)")
    p.add_argument("logs", nargs="+", help="log.jsonl files or run folders")
    p.add_argument("-o", "--output", default="training.png")
    p.add_argument("--delta", type=float, default=None, help="draw this delta as a horizontal line")
    return p


def run(args) -> int:
    path = plot_logs(args.logs, args.output, delta=args.delta)
    print(f"wrote {path}")
    return 0
