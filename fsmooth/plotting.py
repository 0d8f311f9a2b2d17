"""Figures: training curves in the style of the paper's Figures 2-3, and the defense calibration search."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .io import atomic_path, read_jsonl

__all__ = ["read_log", "plot_logs", "plot_calibration", "save_figure"]


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a ``log.jsonl`` (or of ``<run>/log.jsonl`` for a run folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"training log {str(path)!r} does not exist")
    records = read_jsonl(path)
    if not records:
        raise ValueError(f"training log {str(path)!r} is empty")
    return records


def plot_logs(paths, output: str | os.PathLike, *, delta: float | None = None) -> Path:
    """Two panels (accuracy; feature loss, log scale) for one or more runs; returns the PNG path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    fig, (ax_acc, ax_lf) = plt.subplots(1, 2, figsize=(10, 4))
    for path in paths:
        records = read_log(path)
        name = Path(path).parent.name if Path(path).is_file() else Path(path).name
        epochs = [r["epoch"] for r in records]
        for key, style in (("train", "--"), ("test", "-")):
            ax_acc.plot(epochs, [r[f"{key}_acc"] for r in records], style, label=f"{name} {key}")
            ax_lf.plot(epochs, [r[f"{key}_feature_loss"] for r in records], style, label=f"{name} {key}")
    if delta is not None:
        ax_lf.axhline(delta, color="gray", linestyle=":", label=f"delta = {delta:g}")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    ax_lf.set(xlabel="epoch", ylabel="L_F (mean |F - mean F|)", title="Feature loss", yscale="log")
    for ax in (ax_acc, ax_lf):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, output)


def plot_calibration(report: dict, output: str | os.PathLike) -> Path:
    """Defended accuracy, iterations and L-inf distance against delta_test for each beta of a search.

    ``report`` is what :func:`fsmooth.calibrate.calibrate_defense` returns; the chosen
    point is starred, the target's bounds are dotted lines.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, target, chosen = report["points"], report["target"], report["chosen"]
    panels = (("defended clean accuracy", lambda p: p["accuracy"]),
              ("iterations (median; bars q10-q90)", lambda p: p["iterations"]["median"]),
              ("L-inf(defended - input) x 255 (median)", lambda p: p["linf"]["median"]))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for beta in sorted({p["beta"] for p in points}, reverse=True):
        group = sorted((p for p in points if p["beta"] == beta), key=lambda p: p["delta"])
        deltas = [p["delta"] for p in group]
        for ax, (_, value) in zip(axes, panels):
            ax.plot(deltas, [value(p) for p in group], "o-", label=f"beta {beta:.3g}")
        lo = [p["iterations"]["median"] - p["iterations"]["q10"] for p in group]
        hi = [p["iterations"]["q90"] - p["iterations"]["median"] for p in group]
        axes[1].errorbar(deltas, [p["iterations"]["median"] for p in group], yerr=[lo, hi], fmt="none",
                         ecolor="gray", alpha=0.4)
    bare = points[0]["bare_accuracy"]
    axes[0].axhline(bare, color="k", linestyle="--", label=f"bare model {bare:.3f}")
    axes[0].axhline(bare - target["accuracy_tolerance"], color="gray", linestyle=":", label="tolerance")
    axes[1].axhline(target["min_median_iterations"], color="gray", linestyle=":", label="min median")
    axes[1].axhline(report["max_iters"], color="r", linestyle=":", label="cap")
    axes[1].set_yscale("log")
    axes[2].axhline(target["max_median_linf"] * 255, color="gray", linestyle=":", label="max median")
    for ax, (title, value) in zip(axes, panels):
        ax.plot([chosen["delta"]], [value(chosen)], "*", color="k", markersize=14, label="chosen")
        ax.set(xlabel="delta_test", title=title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    verdict = "meets the target" if report["satisfied"] else "NO point met the target: closest shown"
    fig.suptitle(f"Active Defense calibration, n={report['n']} {report.get('split', '')} images, "
                 f"{report['start']['feature_size']} features: {verdict}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, output)


def save_figure(fig, output, dpi: int = 120, **savefig_kwargs) -> Path:
    """Write ``fig`` atomically (temp file, then rename) and close it; returns the path."""
    import matplotlib.pyplot as plt
    output = Path(output)
    try:
        with atomic_path(output) as tmp:
            fig.savefig(tmp, dpi=dpi, **savefig_kwargs)
    finally:
        plt.close(fig)
    return output
