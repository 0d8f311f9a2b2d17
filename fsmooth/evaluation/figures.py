"""The evaluation's figures; they live in :mod:`fsmooth.figures` (kept for existing imports)."""
from __future__ import annotations

from ..figures import accuracy_vs_eps, feature_panels, from_report, iteration_histogram, training_curves

__all__ = ["feature_panels", "iteration_histogram", "accuracy_vs_eps", "training_curves", "from_report"]
