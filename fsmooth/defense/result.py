"""What a defense call returns when asked for more than the defended inputs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["DefenseResult", "EngineRun"]


class EngineRun(NamedTuple):
    """What an engine (:func:`~fsmooth.defense.eager.run_eager`, :meth:`GraphRunner.run`) returns.

    Attributes:
        states: the final loop states ``t``, in the state dtype (fp32, or fp64 for an fp64 prefix).
        iterations: int64 ``(B,)`` update counts.
        loss: ``(B,)`` the loss each sample's exit test saw, in the loss dtype.
        grew: bool ``(B,)``; set once a sample's loss rose for ``DIVERGENCE_PATIENCE`` consecutive updates.
        occupancy: graph engines: the fraction of slot-iterations that did useful work; ``None`` for eager.
    """

    states: torch.Tensor
    iterations: torch.Tensor
    loss: torch.Tensor
    grew: torch.Tensor
    occupancy: float | None = None


@dataclass
class DefenseResult:
    """Defended inputs and per-sample diagnostics of one call.

    Attributes:
        inputs: the defended inputs, shape/dtype/device of ``x``.
        iterations: int64 ``(B,)`` number of updates each sample took.
        converged: bool ``(B,)``; ``False`` where a sample stopped at ``max_iters`` with ``L_F > delta``.
        feature_loss: fp32 ``(B,)`` ``L_F`` of each sample's final ``t`` (the value the exit test saw).
        engine: the engine that ran (``"eager"``, ``"graph"``, ``"chunked"``).
        occupancy: graph engines: the fraction of slot-iterations that did useful work
            (``None`` for the eager engine, which only ever runs active samples).
        diverged: bool ``(B,)``; ``True`` where the divergence guard fired: the sample's ``L_F``
            rose for ``DIVERGENCE_PATIENCE`` consecutive updates, or its defended input ended more
            than ``MAX_DISPLACEMENT`` (L-inf) from the input or non-finite (step size too large).
    """

    inputs: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor
    feature_loss: torch.Tensor
    engine: str
    occupancy: float | None = None
    diverged: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def num_unconverged(self) -> int:
        return int((~self.converged).sum())

    @property
    def num_diverged(self) -> int:
        return 0 if self.diverged is None else int(self.diverged.sum())

    def summary(self) -> dict:
        """Plain numbers for logs and reports."""
        it = self.iterations.double()
        return {
            "samples": len(self),
            "engine": self.engine,
            "mean_iterations": float(it.mean()) if len(self) else 0.0,
            "max_iterations": int(self.iterations.max()) if len(self) else 0,
            "unconverged": self.num_unconverged,
            "diverged": self.num_diverged,
            "occupancy": self.occupancy,
        }
