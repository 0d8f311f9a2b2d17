"""Scores: worst case per image over attacks, re-scoring with fresh defense runs, CIs and sanity checks."""
from __future__ import annotations

import math

import torch

__all__ = ["wilson_interval", "perturbation_check", "worst_case", "choose_candidates", "rescore_summary",
           "accuracy_summary", "gradient_masking_flag", "eps_sweep_flag", "SQUARE_TOLERANCE"]

# AutoAttack's own check flags Square when it beats the other attacks by more than this (checks.check_square_sr).
SQUARE_TOLERANCE = 0.002
Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``k / n`` (``(nan, nan)`` for ``n == 0``)."""
    if n == 0:
        return (math.nan, math.nan)
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n], got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Exact ends for 0/n and n/n (the formula leaves rounding noise there).
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


def accuracy_summary(correct: torch.Tensor) -> dict:
    """``{"n", "correct", "accuracy", "ci95"}`` of a boolean vector."""
    n, k = int(correct.numel()), int(correct.sum())
    return {"n": n, "correct": k, "accuracy": k / n if n else math.nan, "ci95": list(wilson_interval(k, n))}


def perturbation_check(x: torch.Tensor, x_adv: torch.Tensor, eps: float, tol: float = 1e-6) -> dict:
    """Largest L-inf distance, value range, NaNs; ``ok`` when within ``eps + tol`` and [0, 1]."""
    if x_adv.shape != x.shape:
        raise ValueError(f"x_adv must have x's shape {tuple(x.shape)}, got {tuple(x_adv.shape)}")
    if x.numel() == 0:
        return {"max_linf": 0.0, "min": math.nan, "max": math.nan, "nan": 0, "within_eps": True,
                "in_range": True, "ok": True}
    d = (x_adv.double() - x.double()).abs().flatten(1).max(1).values
    nan = int(torch.isnan(x_adv).sum())
    within = bool((d <= eps + tol).all()) and nan == 0
    in_range = bool(x_adv.min() >= 0) and bool(x_adv.max() <= 1)
    return {"max_linf": float(d.max()), "min": float(x_adv.min()), "max": float(x_adv.max()), "nan": nan,
            "within_eps": within, "in_range": in_range, "ok": within and in_range}


def worst_case(correct: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list]:
    """Per image: robust iff correct under every run; and the first run (in order) that fooled it, else ``None``."""
    if not correct:
        raise ValueError("correct must hold at least one run")
    names = list(correct)
    stacked = torch.stack([correct[k].bool() for k in names])
    robust = stacked.all(0)
    first = (~stacked).int().argmax(0)
    fooled_by = [None if bool(robust[i]) else names[int(first[i])] for i in range(robust.numel())]
    return robust, fooled_by


def choose_candidates(x_clean: torch.Tensor, x_adv: dict[str, torch.Tensor], correct: dict[str, torch.Tensor],
                      fallback: list[str]) -> tuple[torch.Tensor, list]:
    """The adversarial image to re-score per image: ``(candidates, source run per image or None)``.

    The first point that moved the image (``x_adv[name][i] != x_clean[i]``) among, in order, the runs that
    fooled it (``correct[name][i]`` false), then the runs in ``fallback``; the clean image only where no run
    moved it. An image the clean pass alone got wrong is re-scored on an attack's point, not on itself, and so
    is an image whose fooling run returned it unmoved (AutoAttack does where its own noisy clean pass already
    erred): the clean image is no attacker's best point when an attack found another.
    """
    out = x_clean.clone()
    source: list = [None] * x_clean.shape[0]
    fooled = {name: ~c.bool() for name, c in correct.items() if name in x_adv}
    for i in range(x_clean.shape[0]):
        names = [name for name, f in fooled.items() if bool(f[i])] + list(fallback)
        for candidate in names:
            if candidate in x_adv and not torch.equal(x_adv[candidate][i], x_clean[i]):
                out[i] = x_adv[candidate][i]
                source[i] = candidate
                break
    return out, source


def rescore_summary(correct_runs: torch.Tensor) -> dict:
    """Mean ± std over fresh defense runs of the accuracy, and the fraction correct in all runs."""
    runs, n = correct_runs.shape
    per_run = correct_runs.double().mean(1) if n else torch.full((runs,), math.nan)
    all_runs = correct_runs.all(0)
    return {"runs": runs, "per_run": per_run.tolist(), "mean": float(per_run.mean()),
            "std": float(per_run.std(unbiased=True)) if runs > 1 else 0.0,
            "correct_in_all_runs": accuracy_summary(all_runs)}


def gradient_masking_flag(blackbox: dict[str, float], whitebox: dict[str, float],
                          tolerance: float = SQUARE_TOLERANCE) -> dict | None:
    """A flag when a black-box/transfer attack beats the best white-box attack by more than ``tolerance``."""
    if not blackbox or not whitebox:
        return None
    best_white = min(whitebox.values())
    strongest = min(blackbox, key=blackbox.get)
    if blackbox[strongest] < best_white - tolerance:
        return {"kind": "gradient masking", "attack": strongest, "accuracy": blackbox[strongest],
                "best_whitebox": best_white, "best_whitebox_attack": min(whitebox, key=whitebox.get),
                "message": f"{strongest} ({blackbox[strongest]:.2%}) beats every white-box attack "
                           f"(best {best_white:.2%}): the gradients the white-box attacks follow are uninformative"}
    return None


def eps_sweep_flag(accuracy_by_eps: dict[float, float], floor: float = 0.1, slack: float = 0.02) -> dict | None:
    """A flag unless accuracy falls (within ``slack``) as eps grows and ends at or below ``floor``."""
    if len(accuracy_by_eps) < 2:
        return None
    eps = sorted(accuracy_by_eps)
    accs = [accuracy_by_eps[e] for e in eps]
    rising = [(eps[i], eps[i + 1]) for i in range(len(eps) - 1) if accs[i + 1] > accs[i] + slack]
    problems = []
    if rising:
        problems.append("accuracy rises between eps " + ", ".join(f"{a * 255:g}->{b * 255:g}/255" for a, b in rising))
    if accs[-1] > floor:
        problems.append(f"accuracy at eps {eps[-1] * 255:g}/255 is {accs[-1]:.2%} > {floor:.0%}")
    if not problems:
        return None
    return {"kind": "eps sweep does not fall towards 0", "message": "; ".join(problems) +
            " (a sign of gradient masking or a too weak attack)"}
