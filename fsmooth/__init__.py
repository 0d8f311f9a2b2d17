"""fsmooth: feature-smoothing training and Active Defense against adversarial examples.

::

    import fsmooth
    criterion = fsmooth.FeatureSmoothingLoss(model)   # training: CE + max(L_F, 0.02)
    x_def = fsmooth.defend(model, x)                  # Active Defense (Algorithm 1)

Submodules are imported on first use, so ``import fsmooth`` stays cheap and has
no side effects (no Triton import, no extension build).
"""
from __future__ import annotations

import importlib

from ._version import __version__  # noqa: F401  (public)

_LAZY = {
    "feature_loss": "fsmooth.functional",
    "feature_loss_and_grad": "fsmooth.functional",
    "feature_loss_reference": "fsmooth.reference",
    "FeatureSmoothingLoss": "fsmooth.loss",
    "prefix": "fsmooth.models.prefix",
    "defend": "fsmooth.defense",
    "ActiveDefense": "fsmooth.defense",
    "DefendedClassifier": "fsmooth.defense",
    "DefenseConfig": "fsmooth.defense",
    "DefenseResult": "fsmooth.defense",
    "DEFENSE_PRESETS": "fsmooth.defense",
    "train": "fsmooth.training",
    "evaluate": "fsmooth.evaluation",
}
_SUBMODULES = ("functional", "reference", "models", "kernels", "defense", "data", "training", "checkpoint",
               "calibrate", "evaluation", "cli")

__all__ = sorted(_LAZY) + list(_SUBMODULES)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
