"""The eager engine: Algorithm 1 in plain PyTorch autograd, on any device.

This is the reference the graph engines are tested against. Each step runs
the prefix only on the samples that are still active (gathered by index), so
exited samples cost nothing and are never touched again.
"""
from __future__ import annotations

import torch

from ..functional import feature_loss_and_grad
from .config import DIVERGENCE_PATIENCE, DefenseConfig
from .result import EngineRun

__all__ = ["run_eager"]


def run_eager(features_fn, t0: torch.Tensor, config: DefenseConfig, *, backend: str = "auto") -> EngineRun:
    """Run the per-sample loop from the noisy start ``t0``.

    ``features_fn(t)`` maps a loop state (fp32/fp64, requires grad) to the
    layer's features. Per sample: ``l = L_F(t)``; while ``l > delta`` and fewer
    than ``max_iters`` updates: ``t -= beta * dL_F/dt``, ``l = L_F(t)``.

    Returns an :class:`EngineRun`: the final states, int64 update counts, the
    loss each sample's exit test saw (in the loss dtype) and a bool flag per
    sample that is set once its loss grew for ``DIVERGENCE_PATIENCE``
    consecutive updates (the divergence guard; it never changes a trajectory).
    Must be called with autograd enabled.
    """
    b = t0.shape[0]
    t = t0.clone()
    iterations = torch.zeros(b, dtype=torch.int64, device=t.device)
    streak = torch.zeros(b, dtype=torch.int64, device=t.device)
    loss_out = None
    active = torch.arange(b, device=t.device)
    while active.numel():
        leaf = t.index_select(0, active).requires_grad_(True)
        feats = features_fn(leaf)
        # Fused loss + closed-form dL_F/dF; fp32 (or fp64) whatever the prefix dtype.
        loss, grad_feats = feature_loss_and_grad(feats.detach(), backend=backend)
        if loss_out is None:
            loss_out = torch.full((b,), float("inf"), dtype=loss.dtype, device=t.device)
            grew = torch.zeros(b, dtype=torch.bool, device=t.device)
        rising = loss > loss_out.index_select(0, active)
        streak.index_copy_(0, active, torch.where(rising, streak.index_select(0, active) + 1, 0))
        grew |= streak >= DIVERGENCE_PATIENCE
        loss_out.index_copy_(0, active, loss)
        keep = (loss > config.delta) & (iterations.index_select(0, active) < config.max_iters)
        if not bool(keep.any()):
            break
        (grad_t,) = torch.autograd.grad(feats, leaf, grad_outputs=grad_feats)
        step = leaf.detach()[keep] - config.beta * grad_t[keep]
        if config.clamp is not None:
            step = step.clamp_(*config.clamp)
        active = active[keep]
        t.index_copy_(0, active, step)
        iterations.index_add_(0, active, torch.ones_like(active))
    if loss_out is None:
        loss_out = torch.empty(0, dtype=torch.float32, device=t.device)
        grew = torch.zeros(0, dtype=torch.bool, device=t.device)
    return EngineRun(t, iterations, loss_out, grew)
