"""``fsmooth summarize``: several ``fsmooth eval`` folders of the same models joined into one table."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..evaluation.store import write_json
from ..evaluation.summary import summarize, summary_markdown
from ..io import write_text_atomic

__all__ = ["add_parser", "run"]


def _name(value: str) -> tuple[str, str]:
    label, sep, name = value.partition("=")
    if not sep or not label or not name:
        raise argparse.ArgumentTypeError(f"--name takes LABEL=NAME, got {value!r}")
    return label, name


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "summarize", help="join fsmooth eval reports: worst case over every attack of every report",
        description="Join the reports of several `fsmooth eval --out` folders per model and setting. An image "
                    "counts as robust only if it survives every attack of every report (on the first n images "
                    "all of them evaluated).")
    p.add_argument("reports", nargs="+", help="fsmooth eval output folders")
    p.add_argument("--name", type=_name, action="append", default=[],
                   help="LABEL=NAME: show the model whose checkpoint label is LABEL as NAME")
    p.add_argument("--out", required=True, help="writes OUT.json and OUT.md")
    return p


def run(args) -> int:
    summary = summarize(args.reports, dict(args.name))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), summary)
    write_text_atomic(out.with_suffix(".md"), summary_markdown(summary))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0
