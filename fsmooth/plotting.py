"""Training curves in the style of the paper's Figures 2-3: accuracy and feature loss per epoch."""
from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["read_log", "plot_logs", "save_figure"]


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a ``log.jsonl`` (or of ``<run>/log.jsonl`` for a run folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"training log {str(path)!r} does not exist")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as exc:
            raise ValueError(f"{str(path)!r} line {number} is not JSON: {exc}") from exc
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


def save_figure(fig, output, dpi: int = 120, **savefig_kwargs) -> Path:
    """Write ``fig`` atomically (temp file, then rename) and close it; returns the path."""
    import matplotlib.pyplot as plt
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.stem}.tmp{output.suffix}")
    fig.savefig(tmp, dpi=dpi, **savefig_kwargs)
    plt.close(fig)
    os.replace(tmp, output)
    return output
