"""Rank and world detection for ``torchrun`` launches, shared by training and evaluation.

``torchrun`` describes the job in ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
:func:`init_from_env` joins that process group (NCCL on ``cuda:LOCAL_RANK`` when
CUDA is available, otherwise gloo). Before a group exists, :func:`env_ranks` reads
the environment; once it does, :func:`rank_and_world` asks the group. An
evaluation shares its chunks out through :class:`Claims` (a rank that finishes
early takes the next chunk); every rank ends with the full merged results and
rank 0 writes the report.
"""
from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["env_ranks", "rank_and_world", "is_main_process", "init_from_env", "collective_timeout",
           "all_gather_object", "barrier", "local_device", "Claims"]


def env_ranks() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` as ``torchrun`` sets them; ``(0, 1, 0)`` outside it."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Rank 0 of the process group, or of the ``torchrun`` environment before the group exists."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return env_ranks()[0] == 0


def local_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", env_ranks()[2])
    return torch.device("cpu")


# c10d hands timeouts to poll() as int milliseconds: above 2**31 - 1 ms (24.8 days) they wrap around.
MAX_TIMEOUT_S = 24 * 24 * 3600.0


def collective_timeout(default_s: float | None = None) -> timedelta | None:
    """How long a collective waits for the slowest rank: ``FSMOOTH_DIST_TIMEOUT_S`` (seconds) when set, else
    ``default_s``; ``None`` leaves torch's default (30 minutes for gloo)."""
    raw = os.environ.get("FSMOOTH_DIST_TIMEOUT_S")
    if raw is not None:
        try:
            seconds = float(raw)
        except ValueError:
            raise ValueError(f"FSMOOTH_DIST_TIMEOUT_S must be a number of seconds, got {raw!r}") from None
        if not 0 < seconds <= MAX_TIMEOUT_S:
            raise ValueError(f"FSMOOTH_DIST_TIMEOUT_S must be positive and at most {MAX_TIMEOUT_S:.0f} s, "
                             f"got {raw!r}")
        return timedelta(seconds=seconds)
    return None if default_s is None else timedelta(seconds=default_s)


def init_from_env(timeout_s: float | None = None) -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1); ``True`` when distributed.

    ``timeout_s``: how long a collective may wait for the slowest rank (see :func:`collective_timeout`).
    """
    if not dist.is_available() or env_ranks()[1] <= 1:
        return False
    if not dist.is_initialized():
        timeout = collective_timeout(timeout_s)
        kwargs = {} if timeout is None else {"timeout": timeout}
        if torch.cuda.is_available():
            torch.cuda.set_device(local_device())
            dist.init_process_group("nccl", **kwargs)
        else:
            dist.init_process_group("gloo", **kwargs)
    return True


def all_gather_object(obj) -> list:
    """``obj`` of every rank (CPU tensors inside are fine with gloo and NCCL)."""
    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


_claim_rounds = itertools.count()  # one number per Claims made in this process: the same on every rank


class Claims:
    """Items ``0 .. n - 1`` shared out over the ranks, each to exactly one, as the ranks become free.

    Iterating yields this rank's items: in a process group the ranks draw from one counter in the group's
    store (an atomic add), so a rank that finishes early takes the next item instead of idling while another
    works through a slow one (with the fixed shares r, r + W, ..., a rank whose chunks' images fall quickly
    waits for one whose images survive an attack for hours). Every rank must make its ``Claims``
    with the same ``n``, in the same order. Without a group: every item, in order. Where the group's store
    cannot be used: the fixed shares, with a warning. :meth:`done` counts the items finished (marked with
    :meth:`finish`) on all ranks, for a progress bar.
    """

    def __init__(self, n: int):
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.n = n
        self.rank, self.world = rank_and_world()
        self._store = None
        self._finished = 0
        if self.world > 1:
            key = f"fsmooth/claims/{next(_claim_rounds)}/{n}"
            try:
                from torch.distributed.distributed_c10d import _get_default_store
                self._store = _get_default_store()
            except (ImportError, RuntimeError, ValueError) as e:
                warnings.warn(f"the process group's store is not usable ({e}): each rank takes the fixed share "
                              "r, r + W, ... of the items", RuntimeWarning, stacklevel=2)
            self._next_key, self._done_key = key + "/next", key + "/done"

    def __iter__(self) -> Iterator[int]:
        if self.world == 1:
            yield from range(self.n)
        elif self._store is None:
            yield from range(self.rank, self.n, self.world)
        else:
            while (item := self._store.add(self._next_key, 1) - 1) < self.n:
                yield item

    def finish(self) -> None:
        """Count one item of this rank's as finished."""
        if self._store is not None:
            self._store.add(self._done_key, 1)
        self._finished += 1

    def done(self) -> int:
        """Items finished on all ranks (this rank's alone with the fixed shares)."""
        return self._store.add(self._done_key, 0) if self._store is not None else self._finished
