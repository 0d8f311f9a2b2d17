"""The ``fsmooth`` command: train, calibrate, plot-log, demo, defend, eval.

Each subcommand lives in a small ``_add_*`` / ``_run_*`` pair; heavy modules are
imported only when their subcommand runs, so ``fsmooth --help`` stays fast.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys

__all__ = ["main", "build_parser"]


def _delta(value: str):
    if value.lower() in ("none", "off", "ce"):
        return None
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--delta must be a number or 'none', got {value!r}") from None
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"--delta must be >= 0, got {value!r}")
    return number


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


# --------------------------------------------------------------------------- train


def _add_train(sub):
    p = sub.add_parser("train", help="train a WRN with the feature-smoothing loss",
                       description="Train a WideResNet on CIFAR with CE + max(L_F, delta). Runs under torchrun "
                                   "for multi-GPU (DDP) training.")
    p.add_argument("--out", required=True, help="run folder: log.jsonl and checkpoints/")
    p.add_argument("--data", default=None, help="data source (torchvision folder, ImageFolder, .tar.gz); "
                                                "default $FSMOOTH_DATA")
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100"])
    p.add_argument("--arch", default="wrn-16-4", help="wrn-28-10, wrn-16-4, ... or wrn-DEPTH-WIDTH")
    p.add_argument("--epochs", type=_positive_int, default=200)
    p.add_argument("--batch-size", type=_positive_int, default=128, help="global batch size")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--delta", type=_delta, default=0.02, help="training delta of max(L_F, delta); 'none': plain CE")
    p.add_argument("--layer", default=None, help="feature layer (default: the model's, block1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--limit-train", type=_positive_int, default=None, help="train on a fixed subset")
    p.add_argument("--limit-test", type=_positive_int, default=None, help="evaluate on a fixed subset")
    p.add_argument("--max-epochs-this-run", type=_positive_int, default=None,
                   help="stop after this many epochs (continue later with --resume)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run folder's latest checkpoint (with the same hyperparameters)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run already in --out (log and checkpoints) and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from .training import train
    result = train(args.out, arch=args.arch, data=args.data, dataset=args.dataset, epochs=args.epochs,
                   batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                   weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, delta=args.delta,
                   layer=args.layer, seed=args.seed, device=args.device, amp=args.amp, compile=args.compile,
                   limit_train=args.limit_train, limit_test=args.limit_test, resume=args.resume,
                   overwrite=args.overwrite, max_epochs_this_run=args.max_epochs_this_run, quiet=args.quiet,
                   command="fsmooth " + shlex.join(args.argv))
    if result.history and not args.quiet and _is_rank0():
        last = result.history[-1]
        print(f"epoch {last['epoch']}: test acc {last['test_acc']:.4f}, test L_F {last['test_feature_loss']:.5f}; "
              f"checkpoint {result.checkpoint}")
    return 0


def _is_rank0() -> bool:
    import os
    return os.environ.get("RANK", "0") == "0"


# --------------------------------------------------------------------------- calibrate


def _positive_floats(value: str) -> tuple[float, ...]:
    try:
        numbers = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {value!r}") from None
    if not numbers or any(not n > 0 for n in numbers):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {value!r}")
    return numbers


def _fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value!r}") from None
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value!r}")
    return number


def _add_calibrate(sub):
    p = sub.add_parser("calibrate", help="choose Active Defense's beta and delta_test for a checkpoint",
                       description="Search beta and delta_test around the paper's scaled starting point "
                                   "(80 x N / 163840, 0.92 x mean clean L_F) on training images until the defense "
                                   "runs in the paper's regime (see fsmooth.calibrate), print every measured point "
                                   "and the choice, draw them, and store the choice in the checkpoint metadata "
                                   "unless --dry-run. --delta-only keeps the older delta_test-only rule.")
    p.add_argument("checkpoint", help="checkpoint folder, run folder or .safetensors file")
    p.add_argument("--data", default=None)
    p.add_argument("--split", default="train", choices=["train", "test"],
                   help="calibration images (default train: never the test images you report on)")
    p.add_argument("--limit", type=_positive_int, default=None,
                   help="number of images, a fixed seeded subset (default: 256 for the search, all for --delta-only)")
    p.add_argument("--max-iters", type=_positive_int, default=800, help="cap on defense iterations per point")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draw shared by every point")
    p.add_argument("--beta-factors", type=_positive_floats, default=None,
                   help="multiples of the scaled beta to try, e.g. 2,1,0.5 (default: 2 down to 1/16)")
    p.add_argument("--delta-ratios", type=_positive_floats, default=None,
                   help="multiples of the mean clean L_F to try as delta_test, preferred first (default 0.92,0.85)")
    p.add_argument("--accuracy-tolerance", type=_fraction, default=None,
                   help="allowed drop of defended clean accuracy (default 0.03)")
    p.add_argument("--max-unconverged", type=_fraction, default=None,
                   help="allowed fraction of images at the cap (default 0.02)")
    p.add_argument("--min-median-iters", type=int, default=None, help="required median iterations (default 100)")
    p.add_argument("--max-median-linf", type=float, default=None,
                   help="allowed median L-inf distance of the defended image, in /255 (default 32)")
    p.add_argument("--figure", default=None, help="PNG of the search (default: calibration.png beside the metadata)")
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--device", default=None)
    p.add_argument("--delta-only", action="store_true",
                   help="only delta_test = 0.92 x mean clean L_F; beta stays the paper's 80")
    p.add_argument("--dry-run", action="store_true", help="print only; write nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_calibrate)


def _calibration_target(args):
    from .calibrate import CalibrationTarget
    fields = {"accuracy_tolerance": args.accuracy_tolerance, "max_unconverged": args.max_unconverged,
              "min_median_iterations": args.min_median_iters,
              "max_median_linf": None if args.max_median_linf is None else args.max_median_linf / 255}
    return CalibrationTarget(**{k: v for k, v in fields.items() if v is not None})


def _run_calibrate(args) -> int:
    from .calibrate import calibrate_checkpoint
    from .checkpoint import resolve_checkpoint
    if args.delta_only:
        report = calibrate_checkpoint(args.checkpoint, data=args.data, split=args.split, limit=args.limit,
                                      batch_size=args.batch_size, device=args.device, write=not args.dry_run,
                                      search=False, quiet=args.quiet)
        distribution = report
    else:
        options = {"target": _calibration_target(args), "max_iters": args.max_iters, "seed": args.seed}
        if args.beta_factors is not None:
            options["beta_factors"] = args.beta_factors
        if args.delta_ratios is not None:
            options["delta_ratios"] = args.delta_ratios
        report = calibrate_checkpoint(args.checkpoint, data=args.data, split=args.split, limit=args.limit,
                                      batch_size=args.batch_size, device=args.device, write=not args.dry_run,
                                      quiet=args.quiet, **options)
        distribution = report["clean_feature_loss"]
    print(f"clean L_F on {distribution['n']} {report['split']} images: mean {distribution['mean']:.5f}, "
          f"std {distribution['std']:.5f}")
    print("quantiles: " + ", ".join(f"q{float(q) * 100:g}={v:.5f}" for q, v in distribution["quantiles"].items()))
    if args.delta_only:
        print(f"suggested delta_test = {report['delta_test']:.4f}  ({report['rule']}); "
              f"{report['fraction_above'] * 100:.1f}% of clean images are above it")
    else:
        _print_search(report)
        weights, meta_path = resolve_checkpoint(args.checkpoint)
        figure = args.figure or (meta_path.with_name("calibration.png") if meta_path.name == "meta.json"
                                 else meta_path.with_suffix(".calibration.png"))
        if not args.dry_run or args.figure:
            from .plotting import plot_calibration
            print(f"wrote {plot_calibration(report, figure)}")
    print("stored in the checkpoint metadata" if not args.dry_run else "(dry run: nothing stored)")
    return 0


def _print_search(report: dict) -> None:
    start = report["start"]
    print(f"start: beta0 = 80 x {start['feature_size']} / 163840 = {start['beta']:.4g}; "
          f"{report['n']} images, seed {report['seed']}, cap {report['max_iters']} iterations")
    print(f"accuracy: bare model {report['bare_accuracy']:.3f}; on the noisy starts alone (sigma "
          f"{report['sigma']:g}, no descent) {report['noise_accuracy']:.3f}")
    print(f"{'beta':>9}{'delta_test':>12}{'bare acc':>10}{'def. acc':>10}{'iters q10/med/q90':>20}"
          f"{'unconv.':>9}{'diverged':>9}{'L-inf med/q90':>15}{'s/img':>8}  ok")
    for p in report["points"]:
        it, linf = p["iterations"], p["linf"]
        iters = "{:.0f}/{:.0f}/{:.0f}".format(it["q10"], it["median"], it["q90"])
        distance = "{:.1f}/{:.1f}".format(linf["median"], linf["q90"])
        ok = "yes" if p["feasible"] else "no: " + ", ".join(p["violations"])
        print(f"{p['beta']:>9.4g}{p['delta']:>12.4g}{p['bare_accuracy']:>10.3f}{p['accuracy']:>10.3f}{iters:>20}"
              f"{p['unconverged']:>9.3f}{p['diverged']:>9.3f}{distance:>15}{p['seconds_per_image']:>8.3f}  {ok}")
    verdict = "chosen" if report["satisfied"] else "NO POINT MET THE TARGET; closest"
    print(f"{verdict}: beta = {report['beta']:.4g}, delta_test = {report['delta_test']:.4g}, "
          f"sigma = {report['sigma']:g}")
    print(f"why: {report['why']}")


# --------------------------------------------------------------------------- plot-log


def _add_plot(sub):
    p = sub.add_parser("plot-log", help="plot a training log (accuracy and feature loss per epoch)")
    p.add_argument("logs", nargs="+", help="log.jsonl files or run folders")
    p.add_argument("-o", "--output", default="training.png")
    p.add_argument("--delta", type=float, default=None, help="draw this delta as a horizontal line")
    p.set_defaults(func=_run_plot)


def _run_plot(args) -> int:
    from .plotting import plot_logs
    path = plot_logs(args.logs, args.output, delta=args.delta)
    print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------- demo / defend


def _add_demo(sub):
    p = sub.add_parser("demo", help="Active Defense on the embedded model: clean/PGD accuracy table + figure")
    p.add_argument("--model", default=None, help="pretrained name or checkpoint (default: the embedded model)")
    p.add_argument("--data", default=None, help="CIFAR-10 source (default $FSMOOTH_DATA, else torchvision download)")
    p.add_argument("-n", "--num-images", type=_positive_int, default=None,
                   help="test images (default 16 on CPU, 256 on GPU)")
    p.add_argument("--pgd-steps", type=_positive_int, default=10)
    p.add_argument("--eps", type=float, default=8 / 255)
    p.add_argument("--max-iters", type=_positive_int, default=None, help="cap on defense iterations")
    p.add_argument("--batch-size", type=_positive_int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default="fsmooth_demo.png", help="Figure-4-style PNG")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from .demo import run_demo
    return run_demo(args)


def _add_defend(sub):
    p = sub.add_parser("defend", help="classify image files with and without Active Defense")
    p.add_argument("images", nargs="+", help="image files (resized to 32x32 if needed)")
    p.add_argument("--model", default=None, help="pretrained name or checkpoint (default: the embedded model)")
    p.add_argument("--outer-loops", type=_positive_int, default=1)
    p.add_argument("--max-iters", type=_positive_int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_defend)


def _run_defend(args) -> int:
    from .demo import run_defend
    return run_defend(args)


# --------------------------------------------------------------------------- eval (issue 5)


def _add_eval(sub) -> None:
    import importlib
    try:
        eval_cli = importlib.import_module("fsmooth.evaluation.cli")
    except ImportError as exc:
        reason = str(exc)
        p = sub.add_parser("eval", help="robustness evaluation (unavailable in this installation)")
        def missing(args):
            return _missing_eval(reason)
        missing._fsmooth_missing = True
        p.set_defaults(func=missing)
        return
    eval_cli.add_parser(sub)


def _missing_eval(reason: str) -> int:
    print(f"fsmooth eval is unavailable: fsmooth.evaluation.cli cannot be imported ({reason})", file=sys.stderr)
    return 2


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fsmooth", description="Feature-smoothing training and Active Defense.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_train(sub)
    _add_calibrate(sub)
    _add_plot(sub)
    _add_demo(sub)
    _add_defend(sub)
    _add_eval(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    func = getattr(args, "func", None)
    if args.command == "eval" and not getattr(func, "_fsmooth_missing", False):
        import importlib  # issue 5 owns the subcommand: it runs via run(args)
        func = importlib.import_module("fsmooth.evaluation.cli").run
    try:
        if getattr(args, "device", None) is not None:  # before any work: a missing GPU is a usage error
            from ._validation import check_device
            check_device(args.device, "--device")
        return int(func(args) or 0)
    except (ValueError, OSError) as exc:  # bad input or an unusable path: one line, not a traceback
        print(f"fsmooth {args.command}: error: {exc}", file=sys.stderr)
        return 2
