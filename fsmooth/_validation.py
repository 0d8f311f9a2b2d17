"""Argument checks shared by the public API: clear errors naming the argument."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_tensor(value, name: str, *, min_dim: int = 1, dim: int | None = None) -> torch.Tensor:
    """Raise ``TypeError``/``ValueError`` naming ``name`` unless ``value`` is a float tensor of the right rank."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in _FLOAT:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if dim is not None and value.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(value.shape)}")
    if value.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(value.shape)}")
    return value


def check_finite(value: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``value`` holds NaN or Inf (synchronises on GPU)."""
    if value.numel() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def as_unit_images(images, name: str = "images") -> torch.Tensor:
    """``images`` (N, C, H, W) as float32 in [0, 1]: uint8 is divided by 255, a float tensor must already be
    finite and in [0, 1]; anything else raises ``TypeError``/``ValueError`` naming ``name``."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{name} must be (N, C, H, W), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise TypeError(f"{name} must be uint8 (0-255) or float in [0, 1], got {images.dtype}")
    images = images.float()
    check_finite(images, name)
    if images.numel() and (float(images.min()) < 0 or float(images.max()) > 1):
        raise ValueError(f"float {name} must lie in [0, 1], got values in [{float(images.min()):.4g}, "
                         f"{float(images.max()):.4g}]")
    return images


def check_number(value, name: str, *, min_value: float | None = None, positive: bool = False,
                 integer: bool = False) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``name`` for a non-number or out-of-range value."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if min_value is not None and value < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {value}")


def check_positive_int(value, name: str, *, allow_none: bool = False):
    """``value`` when it is an int >= 1 (not a bool), or ``None`` with ``allow_none``; else ``ValueError``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")
    return value


def check_bool(value, name: str, *, allow_none: bool = False):
    """``value`` when it is a bool (or ``None`` with ``allow_none``); else ``TypeError`` naming ``name``
    (``bool("no")`` is True: a string or a number is a mistake, not a setting)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool{' or None' if allow_none else ''}, got {value!r}")
    return value


def check_device(device, name: str = "device") -> torch.device:
    """``device`` as a ``torch.device``; ``ValueError`` naming ``name`` if it is malformed or absent here."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"{name} must name a torch device such as 'cpu' or 'cuda:0', got {device!r}") from exc
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} is {str(parsed)!r} but CUDA is not available on this machine")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"{name} is {str(parsed)!r} but this machine has {torch.cuda.device_count()} GPU(s)")
    return parsed


def check_out_dir(path, name: str) -> Path:
    """``path`` as a ``Path`` once it is known that it is, or can become, a folder (no file in the way)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path, got {type(path).__name__}")
    path = Path(path).expanduser()
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise ValueError(f"{name} {str(path)!r} cannot be a folder: {str(candidate)!r} is a file")
            break
    return path
