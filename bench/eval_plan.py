"""Compute plan of a robustness evaluation: measured cost of one defended step, times each row's attack budget.

An attack on Active Defense pays a whole defense run (a few hundred prefix
iterations) for every forward pass it makes. This script measures, on this
machine, with the model's calibrated defense settings (``DefenseConfig.for_model``):

* ``s_forward``: seconds per image of one defended classification (no gradient);
* ``s_step``: seconds per image of one attack step: the defended classification
  plus the straight-through backward pass an attack differentiates;

on ``--probe`` test images in one batch, and multiplies ``s_step`` by the number
of defended evaluations each row of the reproduction needs per image at the
attacks' published default budgets (:class:`fsmooth.evaluation.protocols.Budget`,
pyautoattack's defaults). AutoAttack stops attacking an image once it is broken,
so its count is a range: APGD-CE alone (every image falls at once) to every
attack in full (every image survives). EOT-PGD always runs its whole budget.

    python bench/eval_plan.py --model runs/wrn-fs --data ../shared/datasets/cifar10-jpeg-q75.tar.gz

Writes ``eval_plan.json`` and ``eval_plan.md`` under ``--out-dir``.
"""
from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from fsmooth.data import load_dataset
from fsmooth.defense import DefendedClassifier, DefenseConfig
from fsmooth.evaluation.protocols import Budget
from fsmooth.io import write_json_atomic, write_text_atomic
from fsmooth.models import zoo

from benchlib import configure_logging, default_out_dir, environment

_log = logging.getLogger("bench.eval_plan")

# pyautoattack's defaults for its "standard" L-inf version (autoattack/autoattack.py, set_version).
AA_TARGETS = 9        # APGD-T and FAB-T target classes (CIFAR-10)
FAB_EVALS_PER_ITER = 2  # FAB-T: one forward for the check, one forward+backward for the target's Jacobian


def defended_evaluations(budget: Budget, num_classes: int = 10) -> dict[str, tuple[int, int]]:
    """Defended evaluations per image and attack: ``(lower, upper)`` bounds at ``budget``."""
    targets = min(AA_TARGETS, num_classes - 1)
    apgd = budget.apgd_iter
    apgd_t = targets * budget.apgd_iter
    fab_t = targets * budget.fab_iter * FAB_EVALS_PER_ITER
    square = budget.square_queries
    eot_ce = budget.pgd_steps * budget.eot_draws * budget.pgd_restarts
    eot_dlr = eot_ce * budget.pgd_targets
    return {
        "clean": (1, 1),
        "apgd-ce": (apgd, apgd),
        "apgd-t": (apgd_t, apgd_t),
        "fab-t": (fab_t, fab_t),
        "square": (square, square),
        "aa-standard": (apgd, apgd + apgd_t + fab_t + square),
        "aa-rand": (apgd * budget.eot_draws, 2 * apgd * budget.eot_draws),
        "eot-pgd-ce": (eot_ce, eot_ce),
        "eot-pgd-dlr-targeted": (eot_ce, eot_dlr),
        "transfer": (1, 1),
        "adaptive-apgd (per lambda)": (apgd * budget.adaptive_eot_draws, apgd * budget.adaptive_eot_draws),
    }


def issue12_rows(budget: Budget, n_lambdas: int | None = None) -> list[dict]:
    """The rows of the CPU reproduction (issue 12), in its order of priority. ``n_lambdas``: default, the
    adaptive protocol's runs, lambda = 0 and +-each of ``budget.lambdas``."""
    if n_lambdas is None:
        n_lambdas = len({0.0} | {s * abs(v) for v in budget.lambdas for s in (1, -1)})  # as protocols.plan
    ev = defended_evaluations(budget)
    row2 = ("eot-pgd-ce", "eot-pgd-dlr-targeted", "transfer", "square")
    rows = [
        {"row": 1, "what": "clean, defended outerloop 1, both models", "n": 1000, "evals": ev["clean"], "ol": 1,
         "settings": 2},
        {"row": 1, "what": "clean, defended outerloop 10, both models", "n": 1000, "evals": ev["clean"], "ol": 10,
         "settings": 2},
    ]
    for attack in row2:
        rows.append({"row": 2, "what": f"{attack}, FS model, eps 8 and 16", "n": 500, "evals": ev[attack], "ol": 1,
                     "settings": 2})
    for attack in ("aa-standard", "apgd-ce", "apgd-t", "fab-t", "square"):
        rows.append({"row": 3, "what": f"{attack} (paper protocol), eps 8", "n": 200, "evals": ev[attack], "ol": 1,
                     "settings": 1})
    rows.append({"row": 4, "what": "aa-rand (EOT 20), eps 8", "n": 100, "evals": ev["aa-rand"], "ol": 1,
                 "settings": 1})
    lam = ev["adaptive-apgd (per lambda)"]
    rows.append({"row": 5, "what": f"adaptive APGD-CE, {n_lambdas} lambdas, eps 8", "n": 100,
                 "evals": (lam[0] * n_lambdas, lam[1] * n_lambdas), "ol": 1, "settings": 1})
    rows.append({"row": 6, "what": "outerloop 10 under eot-pgd-ce, eps 8", "n": 100, "evals": ev["eot-pgd-ce"],
                 "ol": 10, "settings": 1})
    for attack in ("clean",) + row2:
        rows.append({"row": 7, "what": f"standard model + Active Defense: {attack}, eps 8 and 16", "n": 200,
                     "evals": ev[attack], "ol": 1, "settings": 1 if attack == "clean" else 2})
    return rows


def measure(model, config: DefenseConfig, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Seconds per image of a defended forward and of a defended forward + straight-through backward."""
    defended = DefendedClassifier(model, config, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # unconverged samples only make the estimate conservative
        with torch.no_grad():
            defended(x[:1])  # warm-up: the first call's one-time costs are not a step's
        start = time.perf_counter()
        with torch.no_grad():
            defended(x)
        forward = time.perf_counter() - start
        iterations = defended.last_info.iterations.double()
        x_adv = x.clone().requires_grad_(True)
        start = time.perf_counter()
        loss = F.cross_entropy(defended(x_adv).float(), y)
        loss.backward()
        step = time.perf_counter() - start
    n = x.shape[0]
    return {"s_forward": forward / n, "s_step": step / n, "mean_iterations": float(iterations.mean()),
            "median_iterations": float(iterations.median()), "probe": n}


def plan_table(rows: list[dict], s_step: float, threads: int = 1) -> list[dict]:
    """Core-hours of each row: ``s_step`` is wall time per image with ``threads`` torch threads."""
    out = []
    for row in rows:
        lo, hi = row["evals"]
        scale = row["n"] * row["ol"] * row["settings"] * s_step * threads / 3600
        out.append(dict(row, evals=list(row["evals"]), core_hours=[lo * scale, hi * scale]))
    return out


def markdown(result: dict) -> str:
    m, env = result["measured"], result["environment"]
    lines = [
        f"# Evaluation compute plan: `{result['model']}`",
        "",
        f"Measured {env['date']} on {env['device']} ({env['cpu']}, {result['threads']} thread(s)), torch "
        f"{env['torch']}, command: `{env['command']}`.",
        "",
        f"Defense: beta {result['defense']['beta']:.4g}, delta_test {result['defense']['delta']:.4g}, sigma "
        f"{result['defense']['sigma']:g}; on {m['probe']} test images of {result['data']}: mean "
        f"{m['mean_iterations']:.0f} / median {m['median_iterations']:.0f} defense iterations, "
        f"**{m['s_forward']:.3f} s per image per defended forward, {m['s_step']:.3f} s per attack step**.",
        "",
        "| row | what | n | settings | outer loops | defended evaluations / image | core-hours (est.) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lo, hi = r["evals"]
        clo, chi = r["core_hours"]
        evals = f"{lo:,}" if lo == hi else f"{lo:,} to {hi:,}"
        hours = f"{clo:.1f}" if lo == hi else f"{clo:.1f} to {chi:.1f}"
        lines.append(f"| {r['row']} | {r['what']} | {r['n']} | {r['settings']} | {r['ol']} | {evals} | {hours} |")
    total = [sum(r["core_hours"][i] for r in result["rows"]) for i in (0, 1)]
    lines += ["", f"Total: {total[0]:.0f} to {total[1]:.0f} core-hours (estimated from the measured step cost; "
              "upper bounds assume no image is broken early)."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=zoo.DEFAULT_PRETRAINED, help="embedded model name or checkpoint path")
    p.add_argument("--data", default=None, help="CIFAR-10 source (default $FSMOOTH_DATA)")
    p.add_argument("--probe", type=int, default=64, help="test images timed in one batch")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the cost of one background job)")
    p.add_argument("--out-dir", default=None, help="default bench/results/")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    configure_logging(args.verbose)
    if args.probe < 1 or args.threads < 1:
        raise SystemExit("eval_plan: --probe and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    model, _ = zoo.load_classifier(args.model)
    images, labels = load_dataset(args.data, "test")
    index = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))[:args.probe]
    config = DefenseConfig.for_model(model)
    measured = measure(model, config, images[index].float() / 255, labels[index])
    budget = Budget()
    result = {
        "benchmark": "eval_plan", "model": args.model, "data": "CIFAR-10 (JPEG q75 copy)",
        "threads": args.threads, "environment": environment("cpu"),
        "defense": {"sigma": config.sigma, "beta": config.beta, "delta": config.delta},
        "budget": budget.as_dict(), "measured": measured,
        "rows": plan_table(issue12_rows(budget), measured["s_step"], args.threads),
    }
    out = Path(args.out_dir) if args.out_dir else default_out_dir(False)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "eval_plan.json", result)
    text = markdown(result)
    write_text_atomic(out / "eval_plan.md", text)
    _log.info("wrote %s", out / "eval_plan.md")
    print(text)
    return result


if __name__ == "__main__":
    main()
