"""The global math flags a captured CUDA graph bakes in.

A graph records the kernels chosen at capture: whether cuBLAS and cuDNN may use
TF32 for fp32 work, reduced-precision reductions for half types, cuDNN's
algorithm search and determinism. Changing a flag later changes nothing in a
replayed graph, so the graph engines key their captures by
:func:`capture_flags` (see ``ActiveDefense._runner`` and
``GraphRunner._signature``): a call under other flags gets graphs captured
under those flags.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import NamedTuple

import torch

__all__ = ["CaptureFlags", "capture_flags", "tf32_allowed"]


class CaptureFlags(NamedTuple):
    """Flag values at one moment (hashable: a cache key). ``"?"`` marks a flag this torch cannot report."""

    matmul_allow_tf32: object
    cudnn_allow_tf32: object
    matmul_fp32_precision: object   # torch >= 2.9's per-backend API; "-" where absent
    cudnn_conv_fp32_precision: object
    float32_matmul_precision: object
    bf16_reduced_precision_reduction: object
    fp16_reduced_precision_reduction: object
    cudnn_enabled: object
    cudnn_benchmark: object
    cudnn_deterministic: object
    deterministic_algorithms: object


def _read(get):
    try:
        return get()
    except AttributeError:
        return "-"
    except RuntimeError:  # torch refuses to read a legacy flag once the new API set it, and vice versa
        return "?"


def capture_flags() -> CaptureFlags:
    """The current values of every flag that changes which kernels a CUDA graph captures."""
    b = torch.backends
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch deprecates reading the legacy allow_tf32 flags
        return CaptureFlags(
            matmul_allow_tf32=_read(lambda: b.cuda.matmul.allow_tf32),
            cudnn_allow_tf32=_read(lambda: b.cudnn.allow_tf32),
            matmul_fp32_precision=_read(lambda: b.cuda.matmul.fp32_precision),
            cudnn_conv_fp32_precision=_read(lambda: b.cudnn.conv.fp32_precision),
            float32_matmul_precision=_read(torch.get_float32_matmul_precision),
            bf16_reduced_precision_reduction=_read(lambda: b.cuda.matmul.allow_bf16_reduced_precision_reduction),
            fp16_reduced_precision_reduction=_read(lambda: b.cuda.matmul.allow_fp16_reduced_precision_reduction),
            cudnn_enabled=_read(lambda: b.cudnn.enabled),
            cudnn_benchmark=_read(lambda: b.cudnn.benchmark),
            cudnn_deterministic=_read(lambda: b.cudnn.deterministic),
            deterministic_algorithms=_read(torch.are_deterministic_algorithms_enabled),
        )


@contextlib.contextmanager
def tf32_allowed(allowed: bool):
    """Allow (or forbid) TF32 for fp32 matmuls and convolutions inside the block, then restore the old flags.

    fp32 parity checks against the eager engine need ``tf32_allowed(False)``: cuBLAS/cuDNN may
    otherwise pick TF32 kernels on Ampere and later.
    """
    cuda, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch prefers fp32_precision; the legacy flags still work
        saved = (cuda.allow_tf32, cudnn.allow_tf32)
        cuda.allow_tf32 = cudnn.allow_tf32 = bool(allowed)
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cuda.allow_tf32, cudnn.allow_tf32 = saved
