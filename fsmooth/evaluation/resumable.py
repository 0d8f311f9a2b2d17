"""An attack that resumes inside a chunk: a long attack's work is saved between its steps.

EOT-PGD on a defended model costs some 200 defended passes per restart; on one CPU core a chunk of 10 images
takes the better part of an hour, and a chunk killed at a session's end used to start over. An attack whose
class says ``resumable = True`` takes ``checkpoint`` (called before each of its steps) and ``resume`` (the state
it last saved); :func:`run_attack` runs it over a chunk's batches and keeps, in the chunk's
:class:`~fsmooth.evaluation.store.ChunkProgress`, the finished batches' points, the current batch's state and
the global random state (the defense's noise) at that point. A resumed chunk gives the points of a chunk
never stopped.
"""
from __future__ import annotations

import logging
import time
import warnings

import torch

from .._machine import machines_with
from .store import rng_state, set_rng_state

__all__ = ["SAVE_EVERY_S", "Checkpoint", "batch_slices", "run_attack"]

_log = logging.getLogger(__name__)

SAVE_EVERY_S = 60.0  # between saves of an attack's state: a few MB each, negligible beside a minute of attacking


class Checkpoint:
    """What a resumable attack calls before each step: ``checkpoint(make_state)`` saves ``make_state()`` through
    ``save`` once :data:`SAVE_EVERY_S` seconds have passed since the last save (:meth:`save` saves at once).

    ``make_state()`` hands over the attack's own tensors, not copies, which the attack goes on changing in
    place: a checkpoint must serialise them before it returns (``save`` writes them at once)."""

    def __init__(self, save):
        self._save, self._last = save, time.perf_counter()

    def __call__(self, make_state) -> None:
        if time.perf_counter() - self._last >= SAVE_EVERY_S:
            self.save(make_state())  # before the step's random draws: the saved random state is the step's own

    def save(self, state=None) -> None:
        self._save(state)
        self._last = time.perf_counter()


def batch_slices(n: int, size: int) -> list:
    """``n`` images in batches of ``size``, the last one shorter."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _restore(progress, attack, n: int, batch_size: int):
    """The saved work of this chunk, when this same attack saved it on these ``n`` images in these batches."""
    saved = progress.load() if progress is not None else None
    if saved is None:
        return None
    tensors, meta = saved
    if (not attack.same_settings(meta.get("attack")) or meta.get("n") != n
            or meta.get("batch_size") != batch_size):
        warnings.warn(f"chunk {progress.chunk} starts over: its progress in {progress.meta_path} was saved by "
                      "another attack or for other images", RuntimeWarning, stacklevel=3)
        return None
    return tensors, meta


def run_attack(attack, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, progress=None):
    """``(x_adv, info)``: ``attack``'s points on ``x`` (run ``batch_size`` images at a time) and how the run went
    (``info``: where a resumed run went on, the seconds and machines before it).

    ``progress`` (a :class:`~fsmooth.evaluation.store.ChunkProgress`, or ``None``) keeps the finished batches
    and, every :data:`SAVE_EVERY_S` seconds, the current batch's state; a run that finds work saved by the same
    attack on the same images goes on from there, with the random state it was saved with.
    """
    slices = batch_slices(x.shape[0], batch_size)
    info = {"resumed": False, "resumed_at": None, "earlier_wall_s": 0.0, "earlier_machines": []}
    start = time.perf_counter()
    saved = _restore(progress, attack, x.shape[0], batch_size)
    parts, state = [], None
    if saved is not None:
        tensors, meta = saved
        parts = [tensors[f"done/{i}"].to(x.device, x.dtype) for i in range(meta["slices_done"])]
        if meta["state"] is not None:
            state = ({k.removeprefix("state/"): v for k, v in tensors.items() if k.startswith("state/")},
                     meta["state"])
        # At once: even with every batch done (killed after the last save), what follows (the runner's scoring
        # pass through the randomized defense) must draw what it would have drawn.
        set_rng_state({k: v for k, v in tensors.items() if k.startswith("rng_")}, x.device)
        info.update(resumed=True, resumed_at={"batch": len(parts), "step": meta["state"]},
                    earlier_wall_s=float(meta["wall_s"]),
                    earlier_machines=list(meta.get("machines", [])))
        _log.info("chunk %d resumes at batch %d of %d (%s)", progress.chunk, len(parts), len(slices),
                  meta["state"] or "its start")

    def save(current=None):
        # The random state now: at a step's start (current) or at the next batch's start (after a batch).
        tensors = {**{f"done/{i}": p for i, p in enumerate(parts)}, **rng_state(x.device)}
        if current is not None:
            state_tensors, state_meta = current
            tensors.update({f"state/{k}": v for k, v in state_tensors.items()})
        progress.save(tensors, {"attack": attack.settings(), "n": x.shape[0], "batch_size": batch_size,
                                "slices_done": len(parts), "state": None if current is None else state_meta,
                                "machines": machines_with(info["earlier_machines"], x.device),
                                "wall_s": info["earlier_wall_s"] + time.perf_counter() - start})

    checkpoint = Checkpoint(save)
    for i, s in enumerate(slices):
        if i < len(parts):
            continue
        if progress is None or not attack.resumable:
            parts.append(attack(x[s], y[s]))
        else:
            parts.append(attack(x[s], y[s], resume=state, checkpoint=checkpoint))
            checkpoint.save()
        state = None
    return (torch.cat(parts) if parts else x.clone()), info
