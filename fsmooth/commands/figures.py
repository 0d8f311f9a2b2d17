"""``fsmooth figures``: an evaluation's figures (Figs. 4/5, iterations, accuracy vs eps) and training curves."""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import figures
from ..models.zoo import load_classifier

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("figures", help="figures of an evaluation (Figs. 4/5, iterations, accuracy vs eps) "
                                              "and training curves")
    p.add_argument("--report", default=None, help="an eval --out folder")
    p.add_argument("--checkpoint", default=None, help="model for the feature panels (Figures 4/5)")
    p.add_argument("--pretrained", default=None, help="an embedded model for the feature panels")
    p.add_argument("--log", action="append", default=[], help="training log.jsonl (Figures 2/3); repeatable")
    p.add_argument("--out", default="figures")
    return p


def run(args) -> int:
    made = []
    if args.report:
        model = load_classifier(args.pretrained or args.checkpoint)[0] if (args.checkpoint or args.pretrained) else None
        made += figures.from_report(args.report, args.out, model=model)
    for i, log in enumerate(args.log):
        made.append(figures.training_curves(log, Path(args.out) / f"training_{i}.png"))
    if not made:
        raise ValueError("nothing to plot: give --report and/or --log")
    for path in made:
        print(path)
    return 0
