"""``fsmooth demo``: Active Defense on the embedded model, a clean/PGD accuracy table and a Figure-4 PNG."""
from __future__ import annotations

import argparse

from ..demo import run_demo
from .argtypes import eps_255, positive_int

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="Active Defense on the embedded model: clean/PGD accuracy table + figure")
    p.add_argument("--model", default=None, help="pretrained name or checkpoint (default: the embedded model)")
    p.add_argument("--data", default=None, help="CIFAR-10 source (default $FSMOOTH_DATA, else torchvision download)")
    p.add_argument("-n", "--num-images", type=positive_int, default=None,
                   help="test images (default 16 on CPU, 256 on GPU)")
    p.add_argument("--pgd-steps", type=positive_int, default=10)
    p.add_argument("--eps", type=eps_255, default=8.0, help="L-inf PGD radius in 1/255 units, as eval's (default 8)")
    p.add_argument("--max-iters", type=positive_int, default=None, help="cap on defense iterations")
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default="fsmooth_demo.png", help="Figure-4-style PNG")
    p.add_argument("--quiet", action="store_true")
    return p


def run(args) -> int:
    return run_demo(args)
