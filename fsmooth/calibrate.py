"""Calibrate Active Defense for a trained model: the step size ``beta`` and the threshold ``delta_test``.

The paper's operating point (the target)
----------------------------------------
The paper runs Algorithm 1 on its feature-smoothed WRN-28-10 (block1, N = 160x32x32)
with sigma = 0.075, beta = 80 and delta_test = 0.0124, just below the model's mean
clean test ``L_F`` of about 0.0135 (ratio 0.92). In that regime

* a clean or attacked input needs a few hundred iterations (200-400): the descent
  takes many small steps, it does not jump below the threshold in one overshoot;
* the defended input stays within about 32/255 (L-inf) of the input;
* clean accuracy after the defense stays close to the bare model's.

Those numbers do not transfer: ``dL_F/dF = (sign(F - m) - mean sign) / N`` shrinks
like 1/N, so beta = 80 is a ten times larger step on a layer ten times smaller,
and the clean ``L_F`` level differs between networks. :func:`calibrate_defense`
therefore searches, for any classifier and layer, for the setting that lands in
the paper's regime, measured on training-split images:

1. **Start** from the paper, scaled: ``delta_test = 0.92 x mean clean L_F`` and
   ``beta0 = 80 * (N / 163840) * (0.0124 / delta_test)`` (:func:`scaled_beta`,
   :data:`DELTA_RATIO`). The first factor is the layer size. The second is the
   feature magnitude: features ``s`` times larger give an ``L_F``, a threshold and
   an input gradient ``s`` times larger, so the same descent needs a step ``s``
   times smaller (a plain-CE network's ``L_F`` is about 80 times a feature-smoothed
   one's; without this factor its search starts about 100 times too large).
2. **Search**: for each delta ratio (``delta_ratios``, the paper's 0.92 first), try
   ``beta = beta0 x factor`` for the factors in ``beta_factors`` from the largest
   down, measuring on ``n`` images with one seeded noise draw: defended clean
   accuracy against the bare model's, the iteration quantiles, the unconverged and
   diverged fractions and the L-inf distance of the defended input. A sweep stops
   at its first point that meets every constraint of :class:`CalibrationTarget`
   (smaller steps only cost more iterations), once too many samples end at the cap
   although the median count is reached, or once the median passes half of
   ``max_iters`` (smaller steps only add iterations, so neither can improve).
3. **Choose** the feasible point of the first ratio that has one: the largest
   step meeting the constraints at the delta ratio closest to the paper's. When no
   point is feasible it says so (``satisfied: False`` and a warning) and reports the
   point with the smallest total relative violation, never silently.

The trade-off chosen by default: a median of at least 100 iterations
(:attr:`CalibrationTarget.min_median_iterations`), half the paper's lower figure.
That is enough for the descent to take many small steps (on the embedded WRN-16-1 a
median of 33 iterations cost 1.5 points of clean accuracy against 130), and every
defended forward costs half of what 200 would; raise it for a closer match to the
paper at proportionally higher cost.

:func:`calibrate` keeps the older, delta-only rule (``delta_test = 0.92 x mean
clean L_F``, rounded to 4 significant digits) and reports the clean ``L_F``
quantiles.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ._validation import as_unit_images, check_positive_int
from .checkpoint import load_model, update_meta
from .data import load_dataset
from .defense import ActiveDefense, DefenseConfig
from .defense.config import DEFAULT_DELTA, PAPER_BETA, PAPER_FEATURE_SIZE
from .functional import feature_loss
from .models.prefix import prefix as model_prefix

__all__ = ["clean_feature_losses", "suggest_delta_test", "calibrate", "calibrate_defense", "calibrate_checkpoint",
           "scaled_beta", "feature_size", "CalibrationTarget", "CalibrationWarning", "DELTA_RATIO", "QUANTILES",
           "BETA_FACTORS", "DELTA_RATIOS"]

_log = logging.getLogger(__name__)
DELTA_RATIO = 0.92
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
RULE = f"delta_test = {DELTA_RATIO} x mean clean L_F (the paper's 0.0124/0.0135)"
# The search grid around the paper's scaled starting point (see the module docstring).
BETA_FACTORS = (2.0, 1.0, 0.5, 0.25, 0.125, 0.0625)
DELTA_RATIOS = (0.92, 0.85)
SEARCH_RULE = ("beta0 = 80 x (N / 163840) x (0.0124 / (0.92 x mean clean L_F)), delta_test = ratio x mean clean "
               "L_F (train split); per ratio (paper's "
               "0.92 first) the largest beta0 x factor meeting every target constraint; the first ratio with "
               "such a point wins")


class CalibrationWarning(UserWarning):
    """No point of the search met every constraint of the calibration target."""


@dataclass(frozen=True)
class CalibrationTarget:
    """The constraints that define the paper's operating point (see the module docstring).

    Attributes:
        accuracy_tolerance: defended clean accuracy may be at most this far below the bare
            model's on the same images (absolute, 0.03 = 3 points).
        max_unconverged: largest fraction of images still above delta_test at ``max_iters``.
        min_median_iterations: the median iteration count must reach this (the paper: 200-400;
            the default 100 halves the cost, see the module docstring).
        max_median_linf: the median L-inf distance between defended and input image (the paper's
            defended images move about 25-32/255).
    """

    accuracy_tolerance: float = 0.03
    max_unconverged: float = 0.02
    min_median_iterations: int = 100
    max_median_linf: float = 32 / 255

    def __post_init__(self):
        for name in ("accuracy_tolerance", "max_unconverged", "max_median_linf"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        value = self.min_median_iterations
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"min_median_iterations must be an int >= 0, got {value!r}")

    def violations(self, point: dict) -> dict[str, float]:
        """Relative violation of each unmet constraint by a measured ``point`` (empty: feasible)."""
        out = {}
        drop = point["bare_accuracy"] - point["accuracy"]
        if drop > self.accuracy_tolerance:
            out["accuracy"] = (drop - self.accuracy_tolerance) / max(self.accuracy_tolerance, 1e-3)
        if point["unconverged"] > self.max_unconverged:
            out["unconverged"] = (point["unconverged"] - self.max_unconverged) / max(self.max_unconverged, 1e-3)
        median = point["iterations"]["median"]
        if median < self.min_median_iterations:
            out["iterations"] = (self.min_median_iterations - median) / self.min_median_iterations
        linf = point["linf"]["median"] / 255
        if linf > self.max_median_linf:
            out["linf"] = (linf - self.max_median_linf) / max(self.max_median_linf, 1e-3)
        return out


def _model_device(model: nn.Module, device) -> torch.device:
    """Where the images go: the model's device; ``device`` may only name it (the model is not moved)."""
    own = next(model.parameters()).device
    if device is None:
        return own
    device = torch.device(device)
    if device.type != own.type or (device.index is not None and device.index != own.index):
        raise ValueError(f"device is {device} but the model is on {own}: move the model there first "
                         "(model.to(device)) or leave device out")
    return own


@torch.no_grad()
def clean_feature_losses(model: nn.Module, images: torch.Tensor, *, layer: str | None = None,
                         batch_size: int = 256, device=None, quiet: bool = True) -> torch.Tensor:
    """Per-image clean ``L_F`` (fp32, CPU) of ``images`` (uint8 or float in [0, 1]) at ``layer``."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (N, C, H, W) tensor, got {type(images).__name__}")
    check_positive_int(batch_size, "batch_size")
    device = _model_device(model, device)
    was_training = model.training
    model.eval()
    net = model_prefix(model, layer)
    out = []
    try:
        for start in tqdm(range(0, images.shape[0], batch_size), disable=quiet, desc="clean L_F"):
            x = as_unit_images(images[start:start + batch_size].to(device))
            out.append(feature_loss(net(x)).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def suggest_delta_test(losses: torch.Tensor, ratio: float = DELTA_RATIO) -> float:
    """``ratio * mean(losses)`` rounded to 4 significant digits (see the module docstring)."""
    if losses.numel() == 0:
        raise ValueError("losses is empty: need at least one clean image to calibrate")
    if not bool(torch.isfinite(losses).all()):
        raise ValueError("losses contains NaN or Inf")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")
    value = ratio * float(losses.double().mean())
    if value <= 0:
        raise ValueError(f"clean feature loss is {value / ratio}; cannot suggest a positive delta_test")
    digits = 3 - int(math.floor(math.log10(value)))
    return round(value, digits)


def _distribution(losses: torch.Tensor) -> dict:
    q = torch.quantile(losses.double(), torch.tensor(QUANTILES, dtype=torch.float64))
    return {
        "n": int(losses.numel()), "mean": float(losses.double().mean()),
        "std": float(losses.double().std()) if losses.numel() > 1 else 0.0,
        "min": float(losses.min()), "max": float(losses.max()),
        "quantiles": {f"{p:g}": float(v) for p, v in zip(QUANTILES, q)},
    }


def calibrate(model: nn.Module, images: torch.Tensor, *, layer: str | None = None, batch_size: int = 256,
              device=None, quiet: bool = True) -> dict:
    """Report of the clean ``L_F`` distribution and the delta-only suggestion ``0.92 x mean``."""
    losses = clean_feature_losses(model, images, layer=layer, batch_size=batch_size, device=device, quiet=quiet)
    delta = suggest_delta_test(losses)
    return dict(_distribution(losses), delta_test=delta, rule=RULE,
                fraction_above=float((losses > delta).double().mean()))


def feature_size(model: nn.Module, layer: str | None, sample: torch.Tensor) -> int:
    """``C*H*W`` of ``layer``'s output for one input like ``sample`` (``(C, H, W)`` or a batch)."""
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"sample must be a torch.Tensor, got {type(sample).__name__}")
    if sample.dim() not in (3, 4):
        raise ValueError(f"sample must be a (C, H, W) or (N, C, H, W) tensor, got shape {tuple(sample.shape)}")
    x = as_unit_images(sample[:1] if sample.dim() == 4 else sample.unsqueeze(0), "sample")
    with torch.no_grad():
        features = model_prefix(model, layer)(x.to(next(model.parameters()).device))
    return int(features[0].numel())


def scaled_beta(size: int, delta_test: float | None = None) -> float:
    """The paper's step carried over to a layer of ``size`` features with threshold ``delta_test``.

    ``80 * (size / 163840) * (0.0124 / delta_test)``: ``dL_F/dF`` shrinks like 1/N, and features ``s``
    times larger make ``L_F``, ``delta_test`` and the input gradient ``s`` times larger, so the same
    descent needs a step ``s`` times smaller (``delta_test`` against the paper's 0.0124 measures ``s``).
    Without ``delta_test`` only the size is scaled.
    """
    check_positive_int(size, "size")
    beta = PAPER_BETA * size / PAPER_FEATURE_SIZE
    if delta_test is None:
        return beta
    if isinstance(delta_test, bool) or not isinstance(delta_test, (int, float)) or not 0 < delta_test < math.inf:
        raise ValueError(f"delta_test must be a positive finite number, got {delta_test!r}")
    return beta * DEFAULT_DELTA / delta_test


def _stats(values: torch.Tensor) -> dict:
    """Mean, 10/50/90% quantiles and max of a non-empty tensor."""
    v = values.double()
    q10, median, q90 = torch.quantile(v, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {"mean": float(v.mean()), "q10": q10, "median": median, "q90": q90, "max": float(v.max())}


def _measure(defense: ActiveDefense, model: nn.Module, x: torch.Tensor, y: torch.Tensor, bare_correct: torch.Tensor,
             config: DefenseConfig, *, seed: int, batch_size: int, quiet: bool, desc: str) -> dict:
    """One search point: defend ``x`` with ``config`` (noise from ``seed``), classify, summarise."""
    generator = torch.Generator().manual_seed(seed)
    correct, iterations, converged, diverged, linf = [], [], [], [], []
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # unconverged/diverged samples are counted below
        for lo in tqdm(range(0, x.shape[0], batch_size), desc=desc, disable=quiet, leave=False):
            xb = x[lo:lo + batch_size]
            info = defense(xb, generator, return_info=True, config=config)
            with torch.no_grad():
                correct.append((model(info.inputs).argmax(1) == y[lo:lo + batch_size]).cpu())
            iterations.append(info.iterations.cpu())
            converged.append(info.converged.cpu())
            flags = getattr(info, "diverged", None)
            diverged.append(flags.cpu() if flags is not None else torch.zeros_like(info.converged.cpu()))
            linf.append((info.inputs.float() - xb.float()).abs().flatten(1).amax(1).cpu())
    seconds = time.perf_counter() - start
    iterations, converged = torch.cat(iterations), torch.cat(converged)
    n = int(x.shape[0])
    return {
        "beta": config.beta, "delta": config.delta, "sigma": config.sigma, "max_iters": config.max_iters,
        "bare_accuracy": float(bare_correct.double().mean()), "accuracy": float(torch.cat(correct).double().mean()),
        "iterations": _stats(iterations), "unconverged": float((~converged).double().mean()),
        "diverged": float(torch.cat(diverged).double().mean()),
        "linf": {k: v * 255 for k, v in _stats(torch.cat(linf)).items()}, "linf_unit": "1/255",
        "n": n, "seconds": seconds, "seconds_per_image": seconds / max(n, 1),
    }


@torch.no_grad()
def _noise_only_correct(defense: ActiveDefense, model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: float, *,
                        seed: int, batch_size: int) -> torch.Tensor:
    """Whether ``model`` classifies ``x + noise`` correctly, with the very noise every search point starts from.

    It separates what the noise costs from what the descent does: defended accuracy below this means the
    descent hurts, above it means the descent repairs part of the noise's damage.
    """
    generator = torch.Generator().manual_seed(seed)
    correct = []
    for lo in range(0, x.shape[0], batch_size):
        xb = x[lo:lo + batch_size]
        noisy = xb + defense.draw_noise(xb, generator, sigma).to(xb.dtype)
        correct.append((model(noisy).argmax(1) == y[lo:lo + batch_size]).cpu())
    return torch.cat(correct)


def _sweep_done(point: dict, target: CalibrationTarget, max_iters: int) -> bool:
    """Whether smaller steps at this delta can no longer give a better point.

    Smaller steps only add iterations: stop at a feasible point, once too many samples
    already end at the cap with the median count reached, or once the median passes
    half the cap (the next halving of beta would put it at the cap).
    """
    violations = point["violations"]
    return (not violations or ("unconverged" in violations and "iterations" not in violations)
            or point["iterations"]["median"] > max_iters / 2)


def calibrate_defense(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, layer: str | None = None,
                      n: int | None = 256, seed: int = 0, sigma: float = 0.075, max_iters: int = 800,
                      target: CalibrationTarget | None = None, beta_factors=BETA_FACTORS,
                      delta_ratios=DELTA_RATIOS, batch_size: int = 256, engine: str = "auto",
                      device=None, quiet: bool = True) -> dict:
    """Choose ``beta`` and ``delta_test`` for ``model`` at ``layer`` (see the module docstring).

    Args:
        images, labels: calibration images (uint8, or float in [0, 1]) and their labels; use the
            training split, never the test images you report on. The first ``n`` are used (``None``: all).
        seed: seed of the one noise draw every search point shares (paired comparisons).
        sigma: the noise half-width (the paper's 0.075; not searched).
        max_iters: the cap per sample at every point; with ``n`` it bounds the runtime.
        target: the constraints (default :class:`CalibrationTarget()`).
        beta_factors: multiples of the scaled start :func:`scaled_beta` to try, largest first.
        delta_ratios: multiples of the mean clean ``L_F`` to try as delta_test, in order of preference.
        engine: defense engine for the measurements (``"auto"``: CUDA graphs on a GPU).

    Returns a JSON-serialisable report: ``sigma``, ``beta``, ``delta_test`` (the choice),
    ``satisfied``, ``why``, ``chosen`` and every measured ``points`` entry, the bare model's
    accuracy and its accuracy on the noisy starts alone (``noise_accuracy``), the starting point,
    the clean ``L_F`` distribution, the target, ``n`` and ``seed``. Warns
    (:class:`CalibrationWarning`) when no point meets the target.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    target = CalibrationTarget() if target is None else target
    if not isinstance(target, CalibrationTarget):
        raise TypeError(f"target must be a CalibrationTarget, got {type(target).__name__}")
    x = as_unit_images(images)
    if not isinstance(labels, torch.Tensor) or labels.shape != x.shape[:1]:
        raise ValueError(f"labels must be a tensor of shape ({x.shape[0]},), got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    check_positive_int(batch_size, "batch_size")
    if check_positive_int(n, "n", allow_none=True) is not None:
        x, labels = x[:n], labels[:n]
    if x.shape[0] == 0:
        raise ValueError("images is empty: need at least one image to calibrate")
    for name, values in (("beta_factors", beta_factors), ("delta_ratios", delta_ratios)):
        if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in values):
            raise ValueError(f"{name} must be a non-empty sequence of positive numbers, got {values!r}")
    if any(r > 1 for r in delta_ratios):
        raise ValueError(f"delta_ratios must be in (0, 1], got {delta_ratios!r}")
    DefenseConfig(sigma=sigma, max_iters=max_iters)  # validates sigma and max_iters before any work
    device = _model_device(model, device)
    was_training = model.training
    model.eval()
    try:
        x, y = x.to(device), labels.to(device)
        with torch.no_grad():
            bare_correct = torch.cat([model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]
                                      for i in range(0, x.shape[0], batch_size)])
        losses = clean_feature_losses(model, x, layer=layer, batch_size=batch_size, quiet=quiet)
        size = feature_size(model, layer, x[:1])
        start_delta = suggest_delta_test(losses)
        beta0 = scaled_beta(size, start_delta)
        defense = ActiveDefense(model, layer, engine=engine)
        noise_correct = _noise_only_correct(defense, model, x, y, sigma, seed=seed, batch_size=batch_size)
        betas = [beta0 * f for f in sorted(set(beta_factors), reverse=True)]
        points = []
        bar = tqdm(total=len(delta_ratios) * len(betas), desc="calibrate", disable=quiet)
        for ratio in delta_ratios:
            delta = suggest_delta_test(losses, ratio)
            for tried, beta in enumerate(betas, 1):
                config = DefenseConfig(sigma=sigma, beta=beta, delta=delta, max_iters=max_iters)
                point = _measure(defense, model, x, y, bare_correct, config, seed=seed, batch_size=batch_size,
                                 quiet=quiet, desc=f"beta {beta:.3g}, delta {delta:.4g}")
                point.update(beta_factor=beta / beta0, delta_ratio=ratio)
                point["violations"] = target.violations(point)
                point["feasible"] = not point["violations"]
                points.append(point)
                bar.update(1)
                _log.info("calibrate: beta %.4g delta %.4g: accuracy %.3f (bare %.3f), median iterations %g, "
                          "unconverged %.3f, median L-inf %.1f/255%s", beta, delta, point["accuracy"],
                          point["bare_accuracy"], point["iterations"]["median"], point["unconverged"],
                          point["linf"]["median"], "" if point["feasible"] else f"; misses {point['violations']}")
                if _sweep_done(point, target, max_iters):
                    bar.update(len(betas) - tried)  # the rest of this sweep is skipped
                    break
        bar.close()
    finally:
        model.train(was_training)
    feasible = [p for p in points if p["feasible"]]
    if feasible:
        chosen = feasible[0]  # points are in preference order: ratio first, then the larger beta
        why = (f"the largest step meeting every constraint at the preferred delta ratio {chosen['delta_ratio']:g}: "
               f"beta {chosen['beta']:.4g} = {chosen['beta_factor']:g} x {beta0:.4g} (80 x {size} / "
               f"{PAPER_FEATURE_SIZE} x {DEFAULT_DELTA} / {start_delta:.4g}); median {chosen['iterations']['median']:g} iterations (>= "
               f"{target.min_median_iterations}), accuracy {chosen['accuracy']:.3f} vs bare "
               f"{chosen['bare_accuracy']:.3f} (tolerance {target.accuracy_tolerance:g}), unconverged "
               f"{chosen['unconverged']:.3f} (<= {target.max_unconverged:g}), median L-inf "
               f"{chosen['linf']['median']:.1f}/255 (<= {target.max_median_linf * 255:.0f}/255)")
    else:
        chosen = min(points, key=lambda p: sum(p["violations"].values()))
        why = (f"no point met every constraint; the closest (smallest total relative violation) is beta "
               f"{chosen['beta']:.4g}, delta_test {chosen['delta']:.4g}, which misses "
               + ", ".join(f"{k} by {v:.0%}" for k, v in chosen["violations"].items()))
        warnings.warn(f"fsmooth calibrate: {why}. Try a larger max_iters, other beta_factors/delta_ratios or a "
                      "looser target.", CalibrationWarning, stacklevel=2)
    return {
        "sigma": float(sigma), "beta": chosen["beta"], "delta_test": chosen["delta"], "satisfied": bool(feasible),
        "bare_accuracy": float(bare_correct.double().mean()), "noise_accuracy": float(noise_correct.double().mean()),
        "why": why, "rule": SEARCH_RULE, "chosen": chosen, "points": points,
        "start": {"beta": beta0, "delta": start_delta, "delta_ratio": DELTA_RATIO,
                  "feature_size": size},
        "target": dataclasses.asdict(target), "clean_feature_loss": _distribution(losses),
        "layer": layer, "n": int(x.shape[0]), "seed": seed, "max_iters": max_iters,
        "beta_factors": list(beta_factors), "delta_ratios": list(delta_ratios),
    }


def _subset(images, labels, limit):
    """A fixed, seeded subset of ``limit`` images (and labels, when given), in their original order."""
    if limit is None or limit >= images.shape[0]:
        return images, labels
    index = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(1234))[:limit].sort().values
    return images[index], None if labels is None else labels[index]


def calibrate_checkpoint(path, *, data=None, split: str = "train", dataset: str | None = None,
                         limit: int | None = None, batch_size: int = 256, device=None, write: bool = True,
                         images: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                         search: bool = True, quiet: bool = True, **search_options) -> dict:
    """Calibrate a checkpoint on ``split`` of ``data`` and (``write=True``) store the result in its metadata.

    ``search=True`` runs :func:`calibrate_defense` on ``limit`` images (a fixed, seeded
    subset; default its ``n``) and stores ``defense = {sigma, beta, delta}``,
    ``delta_test`` and the whole report under ``calibration``; ``search=False``
    stores only the delta-only rule of :func:`calibrate` (beta stays the paper's).
    """
    model, meta = load_model(path, device=device)
    if images is None:
        images, labels = load_dataset(data, split, dataset or meta.get("dataset", "cifar10"))
    if search:
        if labels is None:
            raise ValueError("labels are required with search=True")
        n = search_options.pop("n", 256)
        images, labels = _subset(images, labels, limit if limit is not None else n)
        report = calibrate_defense(model, images, labels, layer=meta.get("layer"), n=None, batch_size=batch_size,
                                   quiet=quiet, **search_options)
        defense = {"sigma": report["sigma"], "beta": report["beta"], "delta": report["delta_test"]}
    else:
        images, _ = _subset(images, labels, limit)
        report = calibrate(model, images, layer=meta.get("layer"), batch_size=batch_size, quiet=quiet)
        defense = {"delta": report["delta_test"]}
    report["split"] = split
    if write:
        update_meta(path, delta_test=report["delta_test"], defense=defense, calibration=report,
                    calibrated_at_utc=time.strftime("%Y-%m-%dT%H:%M", time.gmtime()))
    return report
