"""Functional API, mirroring :mod:`torch.nn.functional`.

``feature_loss`` dispatches to the fused Triton kernel (:mod:`fsmooth.kernels`)
on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` is set before
the kernels are imported, so CI exercises the real kernel code; everywhere else
it uses the pure-PyTorch reference (:mod:`fsmooth.reference`).
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from ._validation import check_float_tensor
from .reference import feature_loss_grad_reference, feature_loss_reference

__all__ = ["feature_loss", "feature_loss_and_grad", "triton_available", "select_backend"]

_log = logging.getLogger(__name__)
_BACKENDS = ("auto", "triton", "reference")
_REDUCTIONS = ("none", "mean", "sum")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _triton_kernels():
    """The kernel module, or the reason it cannot be imported."""
    try:
        from .kernels import feature_loss as module  # Triton: heavy and optional, only for backend triton
    except Exception as exc:  # ImportError, or a Triton without a usable backend
        return None, f"{type(exc).__name__}: {exc}"
    return module, None


def _interpret_requested() -> bool:
    """``TRITON_INTERPRET=1`` in the environment: ``backend="auto"`` then runs the kernel on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interpreter_active() -> bool:
    """Triton is in interpreter mode (environment or ``triton.knobs``), so CPU tensors can run kernels."""
    if _interpret_requested():
        return True
    try:
        import triton  # optional: only asked whether its interpreter is on
        return bool(triton.knobs.runtime.interpret)
    except (ImportError, AttributeError):
        return False


def triton_available(device: torch.device | str = "cuda") -> tuple[bool, str]:
    """Whether the Triton kernel can run on ``device``; the reason when it cannot."""
    device = torch.device(device)
    if device.type != "cuda" and not _interpreter_active():
        return False, f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1), got {device}"
    module, reason = _triton_kernels()
    if module is None:
        return False, f"cannot import the Triton kernels ({reason})"
    return True, ""


def check_backend(backend) -> str:
    """``backend`` when it names a feature-loss backend; else ``ValueError`` (for construction-time checks)."""
    if not isinstance(backend, str) or backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    return backend


def select_backend(features: torch.Tensor, backend: str = "auto") -> str:
    """Resolve ``backend`` for ``features`` to ``"triton"`` or ``"reference"``."""
    check_backend(backend)
    if backend == "reference":
        return backend
    if backend == "auto" and features.device.type != "cuda" and not _interpret_requested():
        return "reference"
    ok, reason = triton_available(features.device)
    if ok and features.dtype not in _TRITON_DTYPES:
        ok, reason = False, f"the Triton kernel supports {_TRITON_DTYPES}, got {features.dtype}"
    if ok:
        return "triton"
    if backend == "triton":
        raise RuntimeError(f"backend='triton' is unavailable: {reason}")
    if features.device.type == "cuda" and features.dtype in _TRITON_DTYPES:
        _warn_cuda_fallback(reason)
    return "reference"


@functools.lru_cache(maxsize=None)
def _warn_cuda_fallback(reason: str) -> None:
    """Once per reason: a CUDA tensor the kernel supports runs the slower reference (a setup problem, e.g.
    fsmooth used from a source tree without the install that maps ``kernels/`` to ``fsmooth.kernels``)."""
    import warnings
    warnings.warn(f"backend='auto' runs the feature loss's PyTorch reference on CUDA, not the Triton kernel: "
                  f"{reason}", RuntimeWarning, stacklevel=4)  # the caller of feature_loss(_and_grad)


def _check_features(features) -> None:
    check_float_tensor(features, "features", min_dim=2)
    if features.shape[0] and features[0].numel() == 0:
        raise ValueError(f"features must have at least one element per sample, got shape {tuple(features.shape)}")


def feature_loss(features: torch.Tensor, reduction: str = "none", *, backend: str = "auto") -> torch.Tensor:
    """Feature-smoothing loss ``mean(|F - mean(F)|)`` of each sample.

    Args:
        features: ``(B, ...)`` activations; each sample's elements are reduced together.
        reduction: ``"none"`` (per-sample ``(B,)``), ``"mean"`` or ``"sum"`` over the batch.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns fp32 for fp32/fp16/bf16 inputs (fp32 accumulation), fp64 for fp64.
    Differentiable: the gradient is ``(sign(F - m) - mean(sign(F - m))) / N``.
    """
    _check_features(features)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if features.shape[0] == 0:
        loss = features.new_zeros((0,), dtype=torch.promote_types(features.dtype, torch.float32))
    elif select_backend(features, backend) == "triton":
        loss = _triton_kernels()[0].feature_loss_triton(features)
    else:
        loss = feature_loss_reference(features)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def feature_loss_and_grad(
    features: torch.Tensor, grad_scale: torch.Tensor | None = None, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss ``(B,)`` and ``grad_scale[:, None] * dL_F/dF`` without building an autograd graph.

    ``grad_scale``: optional floating-point ``(B,)`` tensor on the device of ``features``.

    This is the fused forward+gradient the Active Defense loop uses: the
    gradient has the shape, dtype and layout of ``features`` and lives in its
    own buffer.
    """
    _check_features(features)
    if grad_scale is not None:
        check_float_tensor(grad_scale, "grad_scale")
        if grad_scale.shape != features.shape[:1]:
            raise ValueError(f"grad_scale must have shape {tuple(features.shape[:1])}, got {tuple(grad_scale.shape)}")
        if grad_scale.device != features.device:
            raise ValueError(f"grad_scale must be on the features' device {features.device}, got {grad_scale.device}")
    if features.shape[0] == 0:
        return features.new_zeros((0,), dtype=torch.promote_types(features.dtype, torch.float32)), features.clone()
    with torch.no_grad():
        if select_backend(features, backend) == "triton":
            return _triton_kernels()[0].feature_loss_and_grad_triton(features, grad_scale)
        # Half precision is scaled in fp32 and rounded once, as the Triton kernel does: rounding first would
        # leave (sign - mean sign) / N, an fp16 subnormal for N above about 16k, to be scaled by beta.
        half = features.dtype in (torch.float16, torch.bfloat16)
        loss, grad = feature_loss_grad_reference(features.float() if half else features)
        if grad_scale is not None:
            shape = (-1,) + (1,) * (features.dim() - 1)
            grad = grad * grad_scale.to(grad.dtype).view(shape)
        if grad.dtype != features.dtype or grad.stride() != features.stride():
            grad = torch.empty_like(features).copy_(grad)  # the features' dtype and layout (channels_last)
        return loss, grad
