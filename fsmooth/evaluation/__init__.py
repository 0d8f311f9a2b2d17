"""Robustness evaluation of Active Defense: the paper's AutoAttack protocol and stronger adaptive attacks.

``fsmooth.evaluate(model, images, labels, protocol="paper,adaptive,beyond", ...)`` runs the
protocols of :mod:`.protocols`, scores the worst case per image, re-scores the final
adversarial images with fresh defense runs and writes ``report.json`` / ``report.md``.
The attacks live in :mod:`.attacks`; ``fsmooth eval`` is :mod:`.cli`.
"""
from .api import evaluate
from .protocols import GROUPS, PROTOCOLS, Budget

__all__ = ["evaluate", "Budget", "PROTOCOLS", "GROUPS"]
