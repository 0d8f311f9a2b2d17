"""Calibrate Active Defense's exit threshold ``delta_test`` for a trained model.

The defense iterates while ``L_F(t) > delta_test``, so ``delta_test`` must sit
just below the feature loss a model produces on clean images: the paper's
feature-smoothed WRN-28-10 has a clean test ``L_F`` of about 0.0135 and uses
``delta_test = 0.0124``. Other architectures (or models trained without L_F)
have a different clean level and need their own value.

Rule (documented, deterministic): ``delta_test = DELTA_RATIO * mean clean L_F``
with ``DELTA_RATIO = 0.92`` (= 0.0124 / 0.0135, the paper's ratio), computed on
the clean images of a split, in eval mode, rounded to 4 significant digits.
The quantiles and the fraction of clean images above the suggestion are
reported so a user can judge it.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from .functional import feature_loss
from .models.prefix import prefix as model_prefix

__all__ = ["clean_feature_losses", "suggest_delta_test", "calibrate", "calibrate_checkpoint", "DELTA_RATIO",
           "QUANTILES"]

_log = logging.getLogger(__name__)
DELTA_RATIO = 0.92
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
RULE = f"delta_test = {DELTA_RATIO} x mean clean L_F (the paper's 0.0124/0.0135)"


@torch.no_grad()
def clean_feature_losses(model: nn.Module, images: torch.Tensor, *, layer: str | None = None,
                         batch_size: int = 256, device=None, quiet: bool = True) -> torch.Tensor:
    """Per-image clean ``L_F`` (fp32, CPU) of ``images`` (uint8 or float in [0, 1]) at ``layer``."""
    from tqdm.auto import tqdm
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (N, C, H, W) tensor, got {type(images).__name__}")
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    net = model_prefix(model, layer)
    out = []
    try:
        for start in tqdm(range(0, images.shape[0], batch_size), disable=quiet, desc="calibrate"):
            x = images[start:start + batch_size].to(device)
            x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
            out.append(feature_loss(net(x)).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def suggest_delta_test(losses: torch.Tensor) -> float:
    """``DELTA_RATIO * mean(losses)`` rounded to 4 significant digits (see the module docstring)."""
    if losses.numel() == 0:
        raise ValueError("losses is empty: need at least one clean image to calibrate")
    if not bool(torch.isfinite(losses).all()):
        raise ValueError("losses contains NaN or Inf")
    value = DELTA_RATIO * float(losses.double().mean())
    if value <= 0:
        raise ValueError(f"clean feature loss is {value / DELTA_RATIO}; cannot suggest a positive delta_test")
    digits = 3 - int(math.floor(math.log10(value)))
    return round(value, digits)


def calibrate(model: nn.Module, images: torch.Tensor, *, layer: str | None = None, batch_size: int = 256,
              device=None, quiet: bool = True) -> dict:
    """Report of the clean ``L_F`` distribution and the suggested ``delta_test``."""
    losses = clean_feature_losses(model, images, layer=layer, batch_size=batch_size, device=device, quiet=quiet)
    delta = suggest_delta_test(losses)
    q = torch.quantile(losses.double(), torch.tensor(QUANTILES, dtype=torch.float64))
    return {
        "n": int(losses.numel()), "mean": float(losses.double().mean()),
        "std": float(losses.double().std()) if losses.numel() > 1 else 0.0,
        "min": float(losses.min()), "max": float(losses.max()),
        "quantiles": {f"{p:g}": float(v) for p, v in zip(QUANTILES, q)},
        "delta_test": delta, "rule": RULE, "fraction_above": float((losses > delta).double().mean()),
    }


def calibrate_checkpoint(path, *, data=None, split: str = "test", dataset: str | None = None,
                         limit: int | None = None, batch_size: int = 256, device=None, write: bool = True,
                         images: torch.Tensor | None = None, quiet: bool = True) -> dict:
    """Calibrate a checkpoint on ``split`` of ``data`` and (``write=True``) store ``delta_test`` in its metadata."""
    from .checkpoint import load_model, update_meta
    from .data import load_dataset
    model, meta = load_model(path, device=device)
    if images is None:
        images, _ = load_dataset(data, split, dataset or meta.get("dataset", "cifar10"))
        if limit is not None and limit < images.shape[0]:
            index = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(1234))[:limit]
            images = images[index.sort().values]
    report = calibrate(model, images, layer=meta.get("layer"), batch_size=batch_size, quiet=quiet)
    report["split"] = split
    if write:
        update_meta(path, delta_test=report["delta_test"], calibration=report)
    return report
