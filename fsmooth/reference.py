"""Pure-PyTorch reference of the feature-smoothing loss.

This is the ground truth for the Triton kernels (tests, benchmarks) and the
fallback path wherever Triton cannot run (CPU without ``TRITON_INTERPRET=1``,
float64 inputs, Triton not installed).

Per sample ``i`` with features ``F_i`` of ``N = C*H*W`` elements::

    m_i   = mean(F_i)
    L_F_i = mean(|F_i - m_i|)
    dL_F_i/dF_i = (sign(F_i - m_i) - mean(sign(F_i - m_i))) / N

``sign(0) = 0`` as in :func:`torch.sign`; autograd through
:func:`feature_loss_reference` produces exactly the closed-form gradient above.
"""
from __future__ import annotations

import torch

__all__ = ["feature_loss_reference", "feature_loss_grad_reference"]


def feature_loss_reference(features: torch.Tensor) -> torch.Tensor:
    """Per-sample loss ``(B,)``, differentiable by autograd, computed in at least fp32."""
    f = features.flatten(1)
    if f.dtype in (torch.float16, torch.bfloat16):
        f = f.float()
    m = f.mean(dim=1, keepdim=True)
    return (f - m).abs().mean(dim=1)


def feature_loss_grad_reference(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss and its closed-form gradient with respect to ``features``.

    The gradient has the shape and dtype of ``features``; the loss is fp32 for
    half-precision inputs and the input dtype otherwise.
    """
    f = features.flatten(1)
    acc = f.float() if f.dtype in (torch.float16, torch.bfloat16) else f
    n = acc.shape[1]
    dev = acc - acc.mean(dim=1, keepdim=True)
    loss = dev.abs().mean(dim=1)
    sign = torch.sign(dev)
    grad = (sign - sign.mean(dim=1, keepdim=True)) / n
    return loss, grad.to(features.dtype).view_as(features)
