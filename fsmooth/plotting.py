"""Training-curve and calibration figures; they live in :mod:`fsmooth.figures` (kept for existing imports)."""
from __future__ import annotations

from .figures import plot_calibration, plot_logs, read_log, save_figure

__all__ = ["read_log", "plot_logs", "plot_calibration", "save_figure"]
