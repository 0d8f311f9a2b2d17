"""pyautoattack's AutoAttack with a recorded budget, and a recorder for the checks it reports.

pyautoattack 0.2.0 (the PyPI copy of fra31/auto-attack) takes keyword-only
``AutoAttack(model, *, attacks, device, eps, norm, seed, version)`` and
``run_standard_evaluation(x, y, /, *, batch_size, state_path)``.

Resuming: its ``state_path`` restore cannot work in 0.2.0. ``EvaluationState``
writes ``attacks_to_run`` (a set) with ``json.dump(default=str)``, so it reads
back a string and every restore fails the "different set of attacks" check with
``ValueError``; past that, the restore branch never assigns ``y_adv``
(``UnboundLocalError``), returns the clean image for every point fooled before
the interruption, and a finished attack is written only if the last write was
more than 60 s before. So :func:`run_autoattack` runs ``run_standard_evaluation``'s
own sequence here (the same checks, clean pass, attacks, seeds and batches, in
the same order: the same points, as a test checks) and saves the chunk's points,
predictions, robust flags and random state after the clean pass and after every
attack: a chunk killed during Square resumes at Square, not at APGD-CE.
"""
from __future__ import annotations

import contextlib
import logging
import time
import warnings

import torch
from pyautoattack import AutoAttack
from pyautoattack import checks as aa_checks

from .._machine import machines_with
from .attacks import AA_LOGGER, set_apgd_iterations
from .resumable import Checkpoint
from .resumable_library import ResumableAPGD, ResumableAPGDT, ResumableFAB, ResumableSquare
from .store import json_value, rng_state, set_rng_state

_log = logging.getLogger(__name__)

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


def _perturb(aa: AutoAttack, attack: str, x: torch.Tensor, y: torch.Tensor, *, resume=None,
             checkpoint=None) -> torch.Tensor:
    """One attack of ``run_standard_evaluation`` on one batch, set up as it sets it up. APGD, APGD-T, Square
    and FAB-T (:mod:`fsmooth.evaluation.resumable_library`) take ``resume`` and ``checkpoint``; untargeted FAB
    runs whole."""
    if attack in ("apgd-ce", "apgd-dlr"):
        aa.apgd.loss = "ce" if attack == "apgd-ce" else "dlr"
        aa.apgd.seed = aa.get_seed()
        return aa.apgd.perturb(x, y, resume=resume, checkpoint=checkpoint)
    if attack == "apgd-t":
        aa.apgd_targeted.seed = aa.get_seed()
        return aa.apgd_targeted.perturb(x, y, resume=resume, checkpoint=checkpoint)
    if attack in ("fab", "fab-t"):
        aa.fab.targeted = attack == "fab-t"
        if aa.fab.targeted:
            aa.fab.n_restarts = 1
        aa.fab.seed = aa.get_seed()
        if aa.fab.targeted:
            return aa.fab.perturb(x, y, resume=resume, checkpoint=checkpoint)
        return aa.fab.perturb(x, y)
    if attack == "square":
        aa.square.seed = aa.get_seed()
        return aa.square.perturb(x, y, resume=resume, checkpoint=checkpoint)
    raise ValueError(f"attack {attack!r} is not one of AutoAttack's")


def _restore(progress, aa: AutoAttack, n: int):
    """The saved work of this chunk, when it was saved by this same AutoAttack on these ``n`` images."""
    saved = progress.load() if progress is not None else None
    if saved is None:
        return None
    tensors, meta = saved
    if meta.get("settings") != json_value(autoattack_settings(aa)) or meta.get("n") != n:
        warnings.warn(f"chunk {progress.chunk} starts over: its progress in {progress.meta_path} was saved by "
                      "another AutoAttack configuration or for other images", RuntimeWarning, stacklevel=3)
        return None
    return tensors, meta


def run_autoattack(aa: AutoAttack, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, progress=None):
    """``(x_adv, y_adv, flags, info)``: AutoAttack's points, its predictions on them, the checks that fired, and
    how the run went (``info``: whether it resumed saved work, the attacks it found done, the attack it found
    part-way, the seconds and machines spent before).

    The points are those of ``aa.run_standard_evaluation(x, y, batch_size=batch_size)``. ``progress`` (a
    :class:`~fsmooth.evaluation.store.ChunkProgress`, or ``None``) keeps the work after the clean pass, after
    each attack, after each batch of an attack, and inside APGD and APGD-T (between iterations), Square
    (between queries) and FAB-T (between target classes) every :data:`~fsmooth.evaluation.resumable.SAVE_EVERY_S`
    seconds; a run that finds work saved by the same AutoAttack on the same images goes on from there, with the
    random state it was saved with. ``aa.apgd``, ``aa.apgd_targeted``, ``aa.square`` and ``aa.fab`` are replaced
    by their resumable copies (same settings, same points).
    """
    if not isinstance(aa.apgd, ResumableAPGD):
        aa.apgd = ResumableAPGD.like(aa.apgd)  # the library's APGD, able to stop between iterations
    if not isinstance(aa.apgd_targeted, ResumableAPGDT):
        aa.apgd_targeted = ResumableAPGDT.like(aa.apgd_targeted)
    if not isinstance(aa.square, ResumableSquare):
        aa.square = ResumableSquare.like(aa.square)  # the library's Square, able to stop between queries
    if not isinstance(aa.fab, ResumableFAB):
        aa.fab = ResumableFAB.like(aa.fab)  # the library's FAB, FAB-T able to stop between target classes
    # check_dynamic counts calls into autograd in a module-level dict that pyautoattack never resets, so
    # after the first dynamic model every later model would be flagged too; start each run from zero.
    for name in aa_checks.funcs:
        aa_checks.funcs[name] = 0
    start = time.perf_counter()
    device = x.device
    recorder = FlagRecorder()
    settings = autoattack_settings(aa)
    saved = _restore(progress, aa, x.shape[0])
    info = {"resumed": False, "resumed_after": [], "resumed_in": None, "earlier_wall_s": 0.0, "earlier_machines": []}
    current = None  # an attack saved part-way: (its meta, its tensors)
    with recorder.recording(), torch.no_grad():
        if saved is None:
            head_x, head_y = x[:batch_size].to(aa.device), y[:batch_size].to(aa.device)
            if aa.version != "rand":
                aa_checks.check_randomized(aa.get_logits, head_x, head_y, bs=batch_size, logger=aa.logger)
            n_cls = aa_checks.check_range_output(aa.get_logits, head_x, logger=aa.logger)
            aa_checks.check_dynamic(aa.model, head_x, False, logger=aa.logger)
            aa_checks.check_n_classes(n_cls, aa.attacks_to_run, aa.apgd_targeted.n_target_classes,
                                      aa.fab.n_target_classes, logger=aa.logger)
            y_adv = torch.empty_like(y)
            for lo in range(0, x.shape[0], batch_size):
                pred = aa.get_logits(x[lo:lo + batch_size].clone().to(aa.device)).max(dim=1)[1]
                y_adv[lo:lo + batch_size] = pred
            robust = y.eq(y_adv).to(device)
            accuracy = {"clean": robust.sum().item() / x.shape[0]}
            x_adv, done = x.clone().detach(), []
        else:
            tensors, meta = saved
            x_adv, y_adv = tensors["x_adv"].to(device), tensors["y_adv"].to(y.device)
            robust = tensors["robust"].to(device)
            accuracy, done = meta["robust_accuracy"], list(meta["attacks_done"])
            for message in meta["flags"]:
                recorder._add(message)
            if meta.get("current"):
                current = (meta["current"], {k.removeprefix("current/"): v for k, v in tensors.items()
                                             if k.startswith("current/")})
            info.update(resumed=True, resumed_after=list(done), earlier_wall_s=float(meta["wall_s"]),
                        earlier_machines=list(meta.get("machines", [])), resumed_in=meta.get("current"))
            set_rng_state(tensors, device)
            _log.info("chunk %d resumes after %s%s: %d of %d images robust", progress.chunk,
                      ", ".join(done) or "the clean pass",
                      f", inside {current[0]['attack']} ({current[0]})" if current else "", int(robust.sum()),
                      x.shape[0])

        def save(at=None):
            """``at``: an attack left part-way, ``(attack, robust_idx, batch start, its state or None)``."""
            tensors = {"x_adv": x_adv, "y_adv": y_adv, "robust": robust, **rng_state(device)}
            part_way = None
            if at is not None:
                attack, robust_idx, lo, state = at
                tensors["current/robust_idx"] = robust_idx
                part_way = {"attack": attack, "batch_start": lo, "state": None if state is None else state[1]}
                if state is not None:
                    tensors.update({f"current/state/{k}": v for k, v in state[0].items()})
            progress.save(tensors, {"attacks_done": done, "robust_accuracy": accuracy, "flags": recorder.messages,
                                    "settings": settings, "n": x.shape[0], "current": part_way,
                                    "machines": machines_with(info["earlier_machines"], device),
                                    "wall_s": info["earlier_wall_s"] + time.perf_counter() - start})

        saver = Checkpoint(save) if progress is not None else None
        if saved is None and saver is not None:
            saver.save()
        for attack in aa.attacks_to_run:
            if attack in done:
                continue
            first, resume = 0, None
            if current is not None and current[0]["attack"] == attack:
                (where, part), current = current, None
                robust_idx, first = part["robust_idx"].to(device), where["batch_start"]
                if where["state"] is not None:
                    resume = ({k.removeprefix("state/"): v for k, v in part.items() if k.startswith("state/")},
                              where["state"])
            else:
                robust_idx = torch.nonzero(robust).flatten()
                if robust_idx.numel() == 0:
                    break  # as pyautoattack: nothing left to attack, and the later attacks are not recorded
            for lo in range(first, robust_idx.numel(), batch_size):
                idx = robust_idx[lo:lo + batch_size]
                xb, yb = x[idx].clone().to(aa.device), y[idx].clone().to(aa.device)
                checkpoint = None if saver is None else (
                    lambda make, lo=lo: saver(lambda: (attack, robust_idx, lo, make())))
                adv = _perturb(aa, attack, xb, yb, resume=resume, checkpoint=checkpoint)
                resume = None
                pred = aa.get_logits(adv).max(dim=1)[1]
                fooled = ~yb.eq(pred).to(device)
                robust[idx[fooled]] = False
                x_adv[idx[fooled]] = adv[fooled].detach().to(device)
                y_adv[idx[fooled]] = pred[fooled].detach().to(y_adv.device)
                if saver is not None and lo + batch_size < robust_idx.numel():
                    saver.save((attack, robust_idx, lo + batch_size, None))  # resumes at the next batch
            accuracy[attack] = robust.sum().item() / x.shape[0]
            done.append(attack)
            if saver is not None:
                saver.save()
                _log.info("chunk %d: %s done, %d of %d images robust (saved)", progress.chunk, attack,
                          int(robust.sum()), x.shape[0])
        aa_checks.check_square_sr(accuracy, logger=aa.logger)
    return x_adv, y_adv, recorder.flags(), info
