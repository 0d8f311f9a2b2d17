"""The evaluation's view of :mod:`fsmooth.distributed` (kept so existing imports keep working)."""
from __future__ import annotations

from ..distributed import all_gather_object, barrier, init_from_env, local_device, rank_and_world

__all__ = ["rank_and_world", "init_from_env", "all_gather_object", "barrier", "local_device"]
