"""argparse value types shared by the subcommands: each parses one string or raises ``ArgumentTypeError``."""
from __future__ import annotations

import argparse
import math

__all__ = ["number", "positive_int", "count", "positive", "eps_255", "fraction", "positive_floats", "delta"]


def number(kind, low: float, *, strict: bool, what: str, high: float = math.inf):
    """An argparse type: ``kind`` (int or float) above ``low`` (``strict``) or at least ``low``, at most ``high``."""
    def parse(value: str):
        try:
            parsed = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if not math.isfinite(parsed) or parsed < low or (strict and parsed == low) or parsed > high:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
        return parsed
    return parse


positive_int = number(int, 1, strict=False, what="a positive integer")
count = number(int, 0, strict=False, what="an integer >= 0")
positive = number(float, 0.0, strict=True, what="a number > 0")
eps_255 = number(float, 0.5, strict=False, what="an eps in 1/255 units (8 means 8/255), at least 0.5")
fraction = number(float, 0.0, strict=False, high=1.0, what="a number in [0, 1]")


def positive_floats(value: str) -> tuple[float, ...]:
    """Comma-separated positive numbers, e.g. ``2,1,0.5``."""
    try:
        numbers = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {value!r}") from None
    if not numbers or any(not n > 0 for n in numbers):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {value!r}")
    return numbers


def delta(value: str) -> float | None:
    """A training delta: a number >= 0, or ``none`` / ``off`` / ``ce`` for plain cross-entropy."""
    if value.lower() in ("none", "off", "ce"):
        return None
    try:
        parsed = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--delta must be a number or 'none', got {value!r}") from None
    if not parsed >= 0:
        raise argparse.ArgumentTypeError(f"--delta must be >= 0, got {value!r}")
    return parsed
