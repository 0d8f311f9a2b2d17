"""Hyperparameters of Active Defense (Algorithm 1) and the paper's presets."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

__all__ = ["DefenseConfig", "DEFENSE_PRESETS", "DEFAULT_DELTA", "PAPER_BETA", "PAPER_FEATURE_SIZE",
           "CALIBRATED_FIELDS", "DIVERGENCE_PATIENCE", "MAX_DISPLACEMENT"]

# The paper's CIFAR-10 delta_test and step size for the feature-smoothed WRN-28-10.
DEFAULT_DELTA = 0.0124
PAPER_BETA = 80.0
# C*H*W of the layer beta = 80 was tuned for: WRN-28-10's block1, 160 x 32 x 32.
PAPER_FEATURE_SIZE = 160 * 32 * 32
# The fields a calibration (``fsmooth calibrate``) stores for a model in ``model.defense_defaults``.
CALIBRATED_FIELDS = ("sigma", "beta", "delta")
# Divergence guard (every engine): a sample diverges when its L_F grows for this many consecutive
# updates, or when its defended input ends farther than MAX_DISPLACEMENT (L-inf, in [0, 1] pixel units:
# half the pixel range) from the input or non-finite. In the paper's regime the loss falls steadily and
# the defended input moves about 32/255; a step too large for the layer overshoots again and again.
DIVERGENCE_PATIENCE = 20
MAX_DISPLACEMENT = 0.5


def _check_real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


@dataclass(frozen=True)
class DefenseConfig:
    """Per-sample loop ``t = x + U(-sigma, sigma)``; while ``L_F(t) > delta``: ``t -= beta * dL_F/dt``.

    Attributes:
        sigma: half-width of the uniform noise added once per call (``>= 0``).
        beta: step size (``> 0``); the paper uses 80 because ``L_F`` is tiny.
        delta: exit threshold on the feature loss (``> 0``), the paper's delta_test.
        max_iters: cap on the number of updates per sample (``>= 1``).
        clamp: optional ``(lo, hi)`` applied after every update (the paper uses none).
    """

    sigma: float = 0.075
    beta: float = 80.0
    delta: float = DEFAULT_DELTA
    max_iters: int = 1000
    clamp: tuple[float, float] | None = None

    def __post_init__(self):
        sigma = _check_real(self.sigma, "sigma")
        beta = _check_real(self.beta, "beta")
        delta = _check_real(self.delta, "delta")
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if delta <= 0:
            raise ValueError(f"delta must be > 0, got {delta}")
        if isinstance(self.max_iters, bool) or not isinstance(self.max_iters, int):
            raise TypeError(f"max_iters must be an int, got {type(self.max_iters).__name__}")
        if self.max_iters < 1:
            raise ValueError(f"max_iters must be >= 1, got {self.max_iters}")
        clamp = self.clamp
        if clamp is not None:
            if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
                raise TypeError(f"clamp must be None or a (lo, hi) pair, got {clamp!r}")
            lo, hi = _check_real(clamp[0], "clamp[0]"), _check_real(clamp[1], "clamp[1]")
            if lo >= hi:
                raise ValueError(f"clamp must satisfy lo < hi, got {clamp!r}")
            clamp = (lo, hi)
        for name, value in (("sigma", sigma), ("beta", beta), ("delta", delta), ("clamp", clamp)):
            object.__setattr__(self, name, value)

    @classmethod
    def preset(cls, name: str, **overrides) -> "DefenseConfig":
        """The paper's setting ``name`` (see :data:`DEFENSE_PRESETS`), with optional field overrides."""
        if name not in DEFENSE_PRESETS:
            raise ValueError(f"unknown defense preset {name!r}; choose from {sorted(DEFENSE_PRESETS)}")
        return dataclasses.replace(DEFENSE_PRESETS[name], **overrides)

    def replace(self, **changes) -> "DefenseConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def for_model(cls, model, **overrides) -> "DefenseConfig":
        """The defense settings for ``model``: its calibration, else the paper's, then ``overrides``.

        The one place every entry point (``defend``, ``ActiveDefense``,
        ``DefendedClassifier``, the CLI, the evaluation and the benchmarks)
        resolves its defaults. In order of precedence:

        1. ``overrides`` whose value is not ``None`` (explicit arguments);
        2. ``model.defense_delta`` when set (the user's own delta_test);
        3. ``model.defense_defaults``: the ``sigma``/``beta``/``delta`` that
           ``fsmooth calibrate`` stored in the checkpoint (set by ``load_model``
           and ``fsmooth.models.pretrained``);
        4. the paper's values (sigma 0.075, beta 80, delta 0.0124), which fit
           WRN-28-10's block1 only: calibrate any other network or layer.
        """
        values = {}
        calibrated = getattr(model, "defense_defaults", None)
        if isinstance(calibrated, dict):
            values.update({k: calibrated[k] for k in CALIBRATED_FIELDS if calibrated.get(k) is not None})
        legacy = getattr(model, "defense_delta", None)
        if legacy is not None:
            values["delta"] = legacy
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown DefenseConfig field(s) {sorted(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


# Paper, Sec. 5: sigma 0.075, beta 80; delta_test per dataset, and the larger thresholds of the
# "Standard (using Active Defense)" baseline (a model trained without L_F).
DEFENSE_PRESETS: dict[str, DefenseConfig] = {
    "cifar10": DefenseConfig(delta=0.0124),
    "cifar100": DefenseConfig(delta=0.0118),
    "cifar10-standard": DefenseConfig(delta=0.0562),
    "cifar100-standard": DefenseConfig(delta=0.0880),
}
