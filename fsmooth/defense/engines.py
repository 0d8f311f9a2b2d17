"""Which engines exist, which can run where, and why not.

``"eager"`` runs everywhere. The CUDA-graph engines need a CUDA device:
``"chunked"`` replays a graph of a few unrolled iterations with one host check
per chunk; ``"graph"`` runs the loop as a device-side WHILE node (torch's
``CUDAGraph.begin_capture_to_while_node`` when present, else the ``fsmooth._C``
extension), so a whole phase is one launch. ``"auto"`` picks ``graph``, then
``chunked``, then ``eager``. ``FSMOOTH_ENFORCE_EAGER=1`` (or
``enforce_eager=True``) is the escape hatch that keeps every call eager.
"""
from __future__ import annotations

import os

import torch

from .while_loop import while_loop_unavailable_reason

__all__ = ["ENGINES", "check_engine", "enforce_eager_env", "unavailable_reason", "resolve_engine"]

ENGINES = ("auto", "eager", "graph", "chunked")


def check_engine(engine) -> str:
    """``engine`` when it names one of :data:`ENGINES`; the one check of an engine name."""
    if not isinstance(engine, str) or engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    return engine


def enforce_eager_env() -> bool:
    return os.environ.get("FSMOOTH_ENFORCE_EAGER", "0") not in ("", "0")


def unavailable_reason(engine: str, device: torch.device, enforce_eager: bool = False) -> str | None:
    """``None`` if ``engine`` can run on ``device``, else a sentence saying why not."""
    if check_engine(engine) == "eager":
        return None
    if enforce_eager or enforce_eager_env():
        return "CUDA-graph engines are disabled (enforce_eager=True or FSMOOTH_ENFORCE_EAGER=1)"
    if device.type != "cuda":
        return f"the {engine!r} engine captures CUDA graphs and needs a CUDA device; x is on {device}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if engine == "graph":
        return while_loop_unavailable_reason(device)
    return None


def resolve_engine(engine: str, device: torch.device, enforce_eager: bool = False) -> str:
    """The concrete engine for ``engine`` on ``device``; raises ``RuntimeError`` when a forced one cannot run."""
    if check_engine(engine) == "auto":
        for candidate in ("graph", "chunked"):
            if unavailable_reason(candidate, device, enforce_eager) is None:
                return candidate
        return "eager"
    reason = unavailable_reason(engine, device, enforce_eager)
    if reason is not None:
        raise RuntimeError(f"engine={engine!r} is unavailable: {reason}")
    return engine
