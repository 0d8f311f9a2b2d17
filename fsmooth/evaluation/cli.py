"""``fsmooth eval``: registered on the main parser by :mod:`fsmooth.cli` (``fsmooth figures`` is
:mod:`fsmooth.commands.figures`).

::

    fsmooth eval --checkpoint runs/wrn/checkpoints/latest --data cifar10.tar.gz --protocol paper,adaptive \\
        --n 1000 --eps 8 16 --outer-loops 1 10 --out results/eval
    torchrun --nproc_per_node=4 --no-python fsmooth eval ...        # sharded over 4 GPUs, one merged report
    fsmooth figures --report results/eval --checkpoint ... --log runs/wrn/log.jsonl --out results/figures
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys

import torch

from .._validation import check_device, check_out_dir
from ..commands.argtypes import count, eps_255, positive, positive_int
from ..commands.figures import run as run_figures  # its old home; kept for callers
from ..data import DATASET_NAMES, evaluation_order, load_dataset
from ..defense.config import DefenseConfig
from ..distributed import init_from_env, is_main_process, local_device
from ..models import zoo
from .api import _defense_config, evaluate
from .protocols import GROUPS, PROTOCOLS, Budget, parse_protocols
from .report import markdown

__all__ = ["add_parser", "run", "run_figures"]

_log = logging.getLogger(__name__)


def _budget_args(p) -> None:
    g = p.add_argument_group("attack budgets (default: the published settings)")
    g.add_argument("--budget", choices=("paper", "tiny"), default="paper",
                   help="'tiny' only checks that everything runs; its numbers mean nothing")
    for flag, kind, help_ in (("--apgd-iter", positive_int, "APGD iterations (AutoAttack, adaptive)"),
                              ("--fab-iter", positive_int, "FAB-T iterations"),
                              ("--square-queries", positive_int, "Square queries"),
                              ("--eot-draws", positive_int, "EOT draws (AutoAttack rand, EOT-PGD, torchattacks)"),
                              ("--pgd-steps", positive_int, "EOT-PGD steps"),
                              ("--pgd-restarts", positive_int, "EOT-PGD restarts"),
                              ("--adaptive-eot-draws", positive_int, "EOT draws of the adaptive APGD (paper: 1)"),
                              ("--rescore-runs", count, "fresh defense runs for re-scoring (0: none)")):
        g.add_argument(flag, type=kind, default=None, help=help_)
    g.add_argument("--lambdas", type=positive, nargs="+", default=None,
                   help="adaptive-attack |lambda| values (each run with both signs)")
    g.add_argument("--sweep-eps", type=eps_255, nargs="+", default=None, help="eps sweep values in 1/255 units")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` on ``subparsers``; returns its parser."""
    p = subparsers.add_parser(
        "eval", help="robustness evaluation: AutoAttack (paper) and adaptive attacks, JSON + markdown report",
        description="Evaluate a checkpoint with Active Defense. Resumable: rerun the same command after an "
                    "interruption. Under torchrun each rank evaluates a share of the test set.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint folder (fsmooth.checkpoint)")
    source.add_argument("--pretrained", help="an embedded model (fsmooth.models.available_pretrained())")
    p.add_argument("--baseline-checkpoint", default=None,
                   help="model trained without L_F, for the 'Standard (using Active Defense)' baseline row")
    p.add_argument("--data", default=None, help="data source (default: $FSMOOTH_DATA)")
    p.add_argument("--dataset", choices=("cifar10", "cifar100"), default=None,
                   help="default: the checkpoint's data set")
    p.add_argument("--dataset-label", default=None, help="how the data set is named in the report")
    p.add_argument("--protocol", default="paper",
                   help=f"comma-separated from {', '.join(PROTOCOLS)} or groups {', '.join(GROUPS)}")
    p.add_argument("--n", "--num-images", dest="n", type=positive_int, default=1000,
                   help="first N test images (under torchrun spell it --num-images: torchrun claims --n)")
    p.add_argument("--eps", type=eps_255, nargs="+", default=[8.0, 16.0], help="L-inf eps in 1/255 units")
    p.add_argument("--outer-loops", type=positive_int, nargs="+", default=[1, 10], help="K values (outerloop)")
    p.add_argument("--defense-preset", default=None, help="cifar10, cifar100, ... (default: the checkpoint's delta)")
    p.add_argument("--baseline-preset", default=None,
                   help="the baseline's defense preset (default: its own calibration, else cifar10-standard)")
    p.add_argument("--max-iters", type=positive_int, default=None, help="defense iteration cap")
    p.add_argument("--layer", default=None)
    p.add_argument("--out", default="runs/eval", help="output folder (report, per-image tensors, state)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-size", type=positive_int, default=250, help="images per resumable chunk")
    p.add_argument("--batch-size", type=positive_int, default=250,
                   help="images per forward/attack call at K=1 (divided by K); lower it on out-of-memory")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse finished chunks in OUT/state (also with another --num-images: every chunk whose "
                        "images are unchanged) and go on from the work a killed chunk saved "
                        "(default on; --no-resume deletes the state first)")
    p.add_argument("--partial", action="store_true",
                   help="report on the images a running or interrupted evaluation in --out has finished, "
                        "attacking nothing new (written to OUT/partial/): the first images every selected run has "
                        "finished; select fewer --eps/--outer-loops to report a run ahead of the others at its n")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no table")
    _budget_args(p)
    return p


def _budget(args):
    budget = Budget.tiny() if args.budget == "tiny" else Budget()
    names = ("apgd_iter", "fab_iter", "square_queries", "eot_draws", "pgd_steps", "pgd_restarts",
             "adaptive_eot_draws", "rescore_runs")
    changes = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.lambdas:
        changes["lambdas"] = tuple(abs(v) for v in args.lambdas)
    if args.sweep_eps:
        changes["eps_sweep"] = tuple(v / 255 for v in args.sweep_eps)
    return budget.replace(**changes)


def _dataset_label(args, dataset: str) -> str:
    if args.dataset_label:
        return args.dataset_label
    name = DATASET_NAMES[dataset]
    source = str(args.data or "")
    return f"{name} (JPEG q75 copy)" if "jpeg" in source.lower() else f"{name} test split ({source or '$FSMOOTH_DATA'})"


def _load(args, device=None):
    """``(model, meta)`` from ``--checkpoint`` or ``--pretrained``."""
    return zoo.load_classifier(getattr(args, "pretrained", None) or args.checkpoint, device=device)


def _check_options(args):
    """Every option checked before a model or data set is loaded; returns the budget."""
    if any(e < 0.5 for e in args.eps):
        raise ValueError(f"--eps is in 1/255 units (8 means 8/255), got {args.eps}")
    parse_protocols(args.protocol)
    for preset in (args.defense_preset, args.baseline_preset):
        if preset is not None:
            DefenseConfig.preset(preset)
    check_out_dir(args.out, "--out")
    if args.device:
        check_device(args.device, "--device")
    return _budget(args)


# Ranks meet after every run to merge their chunks, and one rank's chunks can take hours longer than another's
# (an image that survives to FAB-T or Square on one core): torch's 30-minute gloo default killed such a run on
# 2026-11-26. A crashed rank is still caught at once: torchrun stops the others when one exits.
RANK_WAIT_S = 7 * 24 * 3600.0


def run(args) -> int:
    budget = _check_options(args)
    init_from_env(timeout_s=RANK_WAIT_S)
    device = torch.device(args.device) if args.device else local_device()
    model, meta = _load(args, device)
    dataset = args.dataset or meta.get("dataset", "cifar10")
    images, labels = load_dataset(args.data, "test", dataset=dataset)
    images, labels, image_order = evaluation_order(images, labels)
    defense = _defense_config(args.defense_preset, model)
    baseline = baseline_defense = None
    if args.baseline_checkpoint:
        baseline, _ = zoo.load_classifier(args.baseline_checkpoint, device=device)
        baseline_defense = _defense_config(args.baseline_preset, baseline, fallback="cifar10-standard")
    if args.max_iters is not None:
        defense = defense.replace(max_iters=args.max_iters)
        if baseline_defense is not None:
            baseline_defense = baseline_defense.replace(max_iters=args.max_iters)
    argv = getattr(args, "argv", None)
    command = "fsmooth " + shlex.join(argv) if argv is not None else shlex.join(sys.argv)
    report = evaluate(
        model, images, labels, protocol=args.protocol, n=args.n, eps=[e / 255 for e in args.eps],
        outer_loops=args.outer_loops, defense=defense, baseline_model=baseline, baseline_defense=baseline_defense,
        layer=args.layer, budget=budget, seed=args.seed, chunk_size=args.chunk_size,
        batch_size=args.batch_size, out=args.out, resume=args.resume, quiet=args.quiet, partial=args.partial,
        meta={"command": command, "checkpoint": args.checkpoint or f"pretrained:{args.pretrained}",
              "dataset": _dataset_label(args, dataset), "image_order": image_order,
              "baseline_checkpoint": args.baseline_checkpoint,
              "checkpoint_meta": meta})
    if is_main_process() and not args.quiet:
        print(markdown(report))
    return 0
