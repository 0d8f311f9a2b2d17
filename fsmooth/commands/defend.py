"""``fsmooth defend``: classify image files with and without Active Defense."""
from __future__ import annotations

import argparse

from ..demo import run_defend
from .argtypes import positive_int

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("defend", help="classify image files with and without Active Defense")
    p.add_argument("images", nargs="+", help="image files (resized to 32x32 if needed)")
    p.add_argument("--model", default=None, help="pretrained name or checkpoint (default: the embedded model)")
    p.add_argument("--outer-loops", type=positive_int, default=1)
    p.add_argument("--max-iters", type=positive_int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    return p


def run(args) -> int:
    return run_defend(args)
