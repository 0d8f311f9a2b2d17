"""``fsmooth calibrate``: search Active Defense's beta and delta_test for a checkpoint and store the choice."""
from __future__ import annotations

import argparse

from ..calibrate import CalibrationTarget, calibrate_checkpoint
from ..checkpoint import resolve_checkpoint
from ..figures import plot_calibration
from .argtypes import count, fraction, number, positive_floats, positive_int

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "calibrate", help="choose Active Defense's beta and delta_test for a checkpoint",
        description="Search beta and delta_test around the paper's scaled starting point (delta_test = 0.92 x "
                    "mean clean L_F, beta = 80 x N / 163840 x 0.0124 / delta_test) on training images until the defense runs in the paper's regime (see "
                    "fsmooth.calibrate), print every measured point and the choice, draw them, and store the choice "
                    "in the checkpoint metadata unless --dry-run. --delta-only keeps the older delta_test-only rule.")
    p.add_argument("checkpoint", help="checkpoint folder, run folder or .safetensors file")
    p.add_argument("--data", default=None)
    p.add_argument("--split", default="train", choices=["train", "test"],
                   help="calibration images (default train: never the test images you report on)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="number of images, a fixed seeded subset (default: 256 for the search, all for --delta-only)")
    p.add_argument("--max-iters", type=positive_int, default=800, help="cap on defense iterations per point")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draw shared by every point")
    p.add_argument("--beta-factors", type=positive_floats, default=None,
                   help="multiples of the scaled beta to try, e.g. 2,1,0.5 (default: 2 down to 1/16)")
    p.add_argument("--delta-ratios", type=positive_floats, default=None,
                   help="multiples of the mean clean L_F to try as delta_test, preferred first (default 0.92,0.85)")
    p.add_argument("--accuracy-tolerance", type=fraction, default=None,
                   help="allowed drop of defended clean accuracy (default 0.03)")
    p.add_argument("--max-unconverged", type=fraction, default=None,
                   help="allowed fraction of images at the cap (default 0.02)")
    p.add_argument("--min-median-iters", type=count, default=None, help="required median iterations (default 100)")
    p.add_argument("--max-median-linf", type=number(float, 0.0, strict=False, high=255.0,
                                                    what="a distance in 1/255 units, in [0, 255]"), default=None,
                   help="allowed median L-inf distance of the defended image, in /255 (default 32)")
    p.add_argument("--figure", default=None, help="PNG of the search (default: calibration.png beside the metadata)")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--device", default=None)
    p.add_argument("--delta-only", action="store_true",
                   help="only delta_test = 0.92 x mean clean L_F; beta stays the paper's 80")
    p.add_argument("--dry-run", action="store_true", help="print only; write nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _calibration_target(args):
    fields = {"accuracy_tolerance": args.accuracy_tolerance, "max_unconverged": args.max_unconverged,
              "min_median_iterations": args.min_median_iters,
              "max_median_linf": None if args.max_median_linf is None else args.max_median_linf / 255}
    return CalibrationTarget(**{k: v for k, v in fields.items() if v is not None})


def run(args) -> int:
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
        _, meta_path = resolve_checkpoint(args.checkpoint)
        figure = args.figure or (meta_path.with_name("calibration.png") if meta_path.name == "meta.json"
                                 else meta_path.with_suffix(".calibration.png"))
        if not args.dry_run or args.figure:
            print(f"wrote {plot_calibration(report, figure)}")
    print("stored in the checkpoint metadata" if not args.dry_run else "(dry run: nothing stored)")
    return 0


def _print_search(report: dict) -> None:
    start = report["start"]
    print(f"start: beta0 = 80 x {start['feature_size']} / 163840 x 0.0124 / {start['delta']:.4g} = "
          f"{start['beta']:.4g}; "
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
