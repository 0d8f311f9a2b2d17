"""pyautoattack's AutoAttack with a recorded budget, and a recorder for the checks it reports.

pyautoattack 0.2.0 (the PyPI copy of fra31/auto-attack) takes keyword-only
``AutoAttack(model, *, attacks, device, eps, norm, seed, version)`` and
``run_standard_evaluation(x, y, /, *, batch_size, state_path)``.

Resuming: its ``state_path`` restore cannot work in 0.2.0. ``EvaluationState``
writes ``attacks_to_run`` (a set) with ``json.dump(default=str)``, so it reads
back a string and every restore fails the "different set of attacks" check with
``ValueError``; past that, the restore branch never assigns ``y_adv``
(``UnboundLocalError``) and returns the clean image for every point fooled
before the interruption. So the runner resumes at its own chunk granularity
and gives AutoAttack a fresh ``state_path`` per chunk, which only records the
progress of the chunk in flight.
"""
from __future__ import annotations

import contextlib
import logging
import warnings

import torch
from pyautoattack import AutoAttack
from pyautoattack import checks as aa_checks

from .attacks import AA_LOGGER, set_apgd_iterations

__all__ = ["build_autoattack", "run_autoattack", "autoattack_settings", "FlagRecorder", "classify_flag",
           "STANDARD_ATTACKS", "RAND_ATTACKS"]

STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
RAND_ATTACKS = ("apgd-ce", "apgd-dlr")

_FLAG_KINDS = (
    ("randomized", "randomized defense"),
    ("dynamic", "dynamic defense"),
    ("zero gradient", "zero gradients"),
    ("Square Attack has decreased", "square beats white-box"),
    ("probability distribution", "outputs are probabilities"),
    ("target classes", "too many target classes"),
    ("not possible to use the", "too few classes for DLR"),
)


def classify_flag(message: str) -> str:
    """A short name for one of AutoAttack's check messages."""
    for needle, kind in _FLAG_KINDS:
        if needle in message:
            return kind
    return "other"


class FlagRecorder(logging.Handler):
    """Collects AutoAttack's check warnings (logged on ``auto-attack`` or raised with ``warnings.warn``)."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self._add(record.getMessage())

    def _add(self, message: str) -> None:
        if message not in self.messages:
            self.messages.append(message)

    @contextlib.contextmanager
    def recording(self):
        logger = logging.getLogger(AA_LOGGER)
        logger.addHandler(self)
        # Recorded in the report instead of repeated on the console for every chunk of every run.
        propagate, logger.propagate = logger.propagate, False
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                yield self
        finally:
            logger.removeHandler(self)
            logger.propagate = propagate
        for w in caught:
            if "pyautoattack" in (w.filename or "") or "flags_doc.md" in str(w.message):
                self._add(str(w.message))
            else:  # not AutoAttack's: hand it back to the caller's filters
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    def flags(self) -> list[dict]:
        return [{"kind": classify_flag(m), "message": m} for m in self.messages]


def build_autoattack(model, eps: float, *, version: str = "standard", attacks=None, budget=None,
                     num_classes: int = 10, seed: int = 0, device=None) -> AutoAttack:
    """AutoAttack at ``eps`` (L-inf) with the iteration budget of ``budget`` (paper defaults when ``None``).

    ``attacks`` restricts a standard/rand run to some of its attacks (individual
    mode), keeping that version's settings, as pyautoattack's own
    ``run_standard_evaluation_individual`` does. Target-class counts are capped
    at ``num_classes - 1``.
    """
    aa = AutoAttack(model, device=device or "cpu", eps=eps, norm="Linf", seed=seed, version=version)
    aa.verbose = False
    if budget is not None:
        for apgd in (aa.apgd, aa.apgd_targeted):
            set_apgd_iterations(apgd, budget.apgd_iter)
        aa.fab.n_iter = budget.fab_iter
        aa.square.n_queries = budget.square_queries
        if version == "rand":
            aa.apgd.eot_iter = budget.eot_draws
    aa.apgd_targeted.n_target_classes = min(aa.apgd_targeted.n_target_classes, num_classes - 1)
    aa.fab.n_target_classes = min(aa.fab.n_target_classes, num_classes - 1)
    if attacks is not None:
        unknown = set(attacks) - set(aa.attacks_to_run)
        if unknown:
            raise ValueError(f"attacks {sorted(unknown)} are not part of AutoAttack {version!r}")
        aa.attacks_to_run = list(attacks)
    return aa


def autoattack_settings(aa: AutoAttack) -> dict:
    """The budget AutoAttack will actually run with, for reports."""
    return {
        "version": aa.version, "attacks": list(aa.attacks_to_run), "eps": aa.epsilon, "seed": aa.seed,
        "apgd": {"n_iter": aa.apgd.n_iter, "n_restarts": aa.apgd.n_restarts, "eot_iter": aa.apgd.eot_iter},
        "apgd_t": {"n_iter": aa.apgd_targeted.n_iter, "n_restarts": aa.apgd_targeted.n_restarts,
                   "n_target_classes": aa.apgd_targeted.n_target_classes},
        "fab_t": {"n_iter": aa.fab.n_iter, "n_target_classes": aa.fab.n_target_classes},
        "square": {"n_queries": aa.square.n_queries, "p_init": aa.square.p_init},
    }


def run_autoattack(aa: AutoAttack, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, state_path=None):
    """``(x_adv, y_adv, flags)``: AutoAttack's points, its predictions on them and the checks that fired."""
    # check_dynamic counts calls into autograd in a module-level dict that pyautoattack never resets, so
    # after the first dynamic model every later model would be flagged too; start each run from zero.
    for name in aa_checks.funcs:
        aa_checks.funcs[name] = 0
    recorder = FlagRecorder()
    with recorder.recording():
        x_adv, y_adv = aa.run_standard_evaluation(x, y, batch_size=batch_size, state_path=state_path)
    return x_adv, y_adv, recorder.flags()
