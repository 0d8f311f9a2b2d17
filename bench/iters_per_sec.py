"""Active Defense throughput and latency: eager PyTorch, torch.compile, fsmooth engines and the roofline.

Sections (``--sections``, default all):

* ``roofline``: the device's copy bandwidth and bf16 / TF32 / fp32 matrix-product
  rates measured in this run, and the FLOPs of one image-iteration (forward +
  input-gradient backward of the prefix's convolutions, counted with forward
  hooks on the modules that run).
* ``throughput``: useful image-iterations per second at each ``--batches`` size
  (plus the largest batch that fits, ``--max-batch-probe``), fixed iteration
  schedule (``delta`` tiny: nobody exits, every iteration is useful).
* ``latency``: milliseconds per call at ``--latency-batches`` with
  ``--latency-iters`` fixed iterations (300 by default).
* ``early-exit``: a synthetic but documented exit schedule (see
  :func:`section_exit.calibrate_exit_delta`): masking vs compaction, iteration spread,
  occupancy.
* ``workload``: ``--workload-size`` inputs (10,000) through masking, compaction
  and continuous batching: total time and occupancy.
* ``loss-kernel``: the fused Triton L_F + gradient vs the eager reference
  (``bench/loss_kernel.py``).

Every provider starts from the same points (the defense noise is drawn once
here and added to the inputs; providers run with ``sigma=0``) and runs the same
schedule. Each provider's first call (warm-up, compile, capture) is checked
against the fp32 eager loop and excluded from timing; timed calls rotate among
``--input-sets`` input sets; medians with min/max of ``--repeats`` calls.

Rows run in the order given (batch-major: every provider at the first batch,
then the next batch), so headline rows go first; a row's ``x eager`` needs the
``eager`` row of its batch earlier. With ``--budget-s`` each section prints
its rows' planned seconds (``bench/planner.py``: FLOPs over rates measured in
this run) before running them, and a row that would overrun the budget is
recorded as skipped with its reason.

Usage::

    python bench/iters_per_sec.py --quick                  # CPU smoke configuration, seconds
    python bench/iters_per_sec.py                          # everything (needs a GPU and time)
    python bench/iters_per_sec.py --sections throughput --batches 1 8 64 --providers eager graph-bf16
    python bench/iters_per_sec.py --sections latency --budget-s 300   # plan rows, skip what would overrun
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch

import benchlib
import loss_kernel
import planner
import providers as prov
import section_exit
import section_loss_kernel
import section_profile
import section_roofline
import section_throughput
# Kept importable from here (the tests and older callers use them as iters_per_sec.X).
from planner import workload_planned_s  # noqa: F401
from providers import compare, exit_work_fraction, measure  # noqa: F401
from section_exit import first_exit_iterations  # noqa: F401

_log = logging.getLogger("bench.iters_per_sec")

SECTIONS = ("roofline", "throughput", "latency", "early-exit", "workload", "loss-kernel", "profile")
# eager first: every other row's ratio refers to it. torch.compile last: its compile time is the longest.
DEFAULT_PROVIDERS = ("eager", "eager-bf16", "fsmooth-eager", "graph-fp32", "graph-tf32", "graph-bf16",
                     "chunked-fp32", "chunked-tf32", "chunked-bf16", "compile", "compile-bf16")
EXIT_PROVIDERS = ("eager", "fsmooth-eager", "graph-bf16-nocompact", "graph-bf16", "chunked-bf16-nocompact",
                  "chunked-bf16", "graph-fp32-nocompact", "graph-fp32", "chunked-fp32-nocompact", "chunked-fp32")
QUICK_PROVIDERS = ("eager", "eager-bf16", "fsmooth-eager", "graph-bf16", "chunked-bf16", "compile")
# The kernels of the captured bf16 loop (chunked first: the profiler records its graph replays in full; a
# WHILE loop's trips may be missed), of the same ops run eagerly, and of the compiled loop.
PROFILE_PROVIDERS = ("chunked-bf16", "graph-bf16", "eager-bf16", "compile-bf16")



# ----------------------------------------------------------------------------------------------
# CLI

TABLE_COLUMNS = (("section", "section", ""), ("provider", "provider", ""), ("dtype", "prec", ""),
                 ("batch", "batch", ""), ("iters", "iters", ""), ("status", "status", ""),
                 ("median_ms", "median ms", ".4g"), ("min_ms", "min", ".4g"), ("max_ms", "max", ".4g"),
                 ("useful_iters_per_s", "img-it/s", ".4g"), ("speedup_vs_eager", "x eager", ".2f"),
                 ("roofline_fraction", "roofline", ".1%"), ("occupancy", "occup.", ".2f"),
                 ("compaction_saving", "saving", ".1%"), ("rel_err", "rel err", ".1e"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny CPU configuration (WRN-10-1, batches 1 2, few iterations): seconds")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=None, help="default: all")
    p.add_argument("--arch", default=None, help="model preset (default wrn-28-10; --quick: wrn-10-1)")
    p.add_argument("--layer", default="block1")
    p.add_argument("--device", default=None, help="default: cuda if available else cpu")
    p.add_argument("--providers", nargs="+", default=None, choices=prov.PROVIDER_NAMES)
    p.add_argument("--compile-modes", nargs="+", default=None,
                   help="torch.compile modes, tried in order; the first that works is timed (default: "
                        "max-autotune reduce-overhead default; none with --quick on a CPU)")
    p.add_argument("--batches", nargs="+", type=int, default=None, help="throughput batch sizes")
    p.add_argument("--max-batch-probe", default="graph-bf16",
                   help="provider used to find the largest batch that fits ('' to skip; CUDA only)")
    p.add_argument("--max-batch-cap", type=int, default=8192)
    p.add_argument("--max-batch-providers", nargs="+", default=["graph-bf16", "chunked-bf16", "graph-tf32"],
                   choices=prov.PROVIDER_NAMES, help="providers timed at the largest batch")
    p.add_argument("--iters", type=int, default=None, help="fixed iterations per throughput call")
    p.add_argument("--latency-batches", nargs="+", type=int, default=None)
    p.add_argument("--latency-iters", type=int, default=None)
    p.add_argument("--beta", type=float, default=80.0, help="step size of fixed-iteration runs (paper: 80)")
    p.add_argument("--exit-providers", nargs="+", default=None, choices=prov.PROVIDER_NAMES)
    p.add_argument("--exit-batches", nargs="+", type=int, default=None)
    p.add_argument("--exit-iters", type=int, default=None, help="max_iters of the early-exit schedule")
    p.add_argument("--exit-beta", type=float, default=2.0, help="step size of the synthetic exit schedule")
    p.add_argument("--exit-median", type=float, default=0.5,
                   help="calibrate delta so the median sample exits at this fraction of --exit-iters")
    p.add_argument("--pilot-batch", type=int, default=None)
    p.add_argument("--exit-model", choices=("synthetic", "pretrained"), default="synthetic",
                   help="exit schedule: calibrated on the untrained model, or an embedded trained model")
    p.add_argument("--exit-pretrained", default=None, help="name for --exit-model pretrained (default: first)")
    p.add_argument("--data", default=os.environ.get("FSMOOTH_DATA"),
                   help="CIFAR-10 source for --exit-model pretrained inputs (default: $FSMOOTH_DATA)")
    p.add_argument("--profile-providers", nargs="+", default=list(PROFILE_PROVIDERS), choices=prov.PROVIDER_NAMES,
                   help="providers whose kernels the profile section breaks down")
    p.add_argument("--profile-batch", type=int, default=None, help="batch of the profile (default 512; --quick: 2)")
    p.add_argument("--profile-iters", type=int, default=None,
                   help="fixed iterations of the profiled call (default 20; --quick: 2)")
    p.add_argument("--workload-size", type=int, default=None)
    p.add_argument("--workload-batch", type=int, default=None, help="chunk / slot count of the workload")
    p.add_argument("--workload-precision", default="bf16", choices=("fp32", "tf32", "bf16"))
    p.add_argument("--workload-repeats", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls after the first (checked) one")
    p.add_argument("--input-sets", type=int, default=3)
    p.add_argument("--check-iters", type=int, default=1,
                   help="updates compared against the fp32 eager loop before timing (see check_schedule)")
    p.add_argument("--matmul-size", type=int, default=None)
    p.add_argument("--copy-bytes", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None,
                   help="JSON lines + CSV are appended here (default bench/results/; with --quick a temp dir)")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds this run may take: print each section's planned rows first (FLOPs over rates "
                        "measured here, bench/planner.py) and skip the rows that would overrun")
    p.add_argument("--plan-probe-batch", type=int, default=None,
                   help="larger batch of the rate probe behind --budget-s (default 128; --quick: 2)")
    p.add_argument("--compile-allowance", nargs="+", default=[], metavar="MODE=SECONDS",
                   help="seconds planned for one torch.compile per mode (assumed, default "
                        + ", ".join(f"{k}={v:g}" for k, v in planner.DEFAULT_COMPILE_ALLOWANCE_S.items()) + ")")
    p.add_argument("--tag", default="", help="stored in every row (the GPU suite marks its calls' rows with it)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    args = p.parse_args(argv)
    if args.budget_s is not None and args.budget_s < 0:
        p.error(f"--budget-s must be >= 0, got {args.budget_s:g}")
    allowance = dict(planner.DEFAULT_COMPILE_ALLOWANCE_S)
    for item in args.compile_allowance:
        mode, _, seconds = item.partition("=")
        try:
            allowance[mode] = float(seconds)
        except ValueError:
            p.error(f"--compile-allowance takes MODE=SECONDS, got {item!r}")
    args.compile_allowance = allowance
    _fill_defaults(args)
    return args


def _fill_defaults(args) -> None:
    """Full-size defaults, or the tiny --quick configuration, for every option left unset."""
    quick = args.quick
    # The roofline's probes at GPU size take minutes on a CPU core (an 8192^3 matrix product is 1.1 TFLOP).
    on_cpu = str(args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu")
    defaults = dict(
        arch="wrn-10-1" if quick else "wrn-28-10",
        sections=list(SECTIONS),
        providers=list(QUICK_PROVIDERS if quick else DEFAULT_PROVIDERS),
        batches=[1, 2] if quick else [1, 8, 64, 256, 512],
        iters=3 if quick else 50,
        latency_batches=[1] if quick else [1, 8],
        latency_iters=4 if quick else 300,
        exit_providers=list(("eager", "fsmooth-eager", "graph-bf16-nocompact", "graph-bf16") if quick
                            else EXIT_PROVIDERS),
        exit_batches=[4] if quick else [512],
        exit_iters=8 if quick else 300,
        pilot_batch=4 if quick else 64,
        workload_size=12 if quick else 10000,
        workload_batch=4 if quick else 512,
        profile_batch=2 if quick else 512,
        profile_iters=2 if quick else 20,
        repeats=2 if quick else 5,
        warmup=0 if quick else 1,
        matmul_size=128 if quick else 1024 if on_cpu else 8192,
        copy_bytes=(4 << 20) if quick else (256 << 20) if on_cpu else (1 << 30),
        plan_probe_batch=2 if quick else 128,
    )
    defaults["out_dir"] = str(benchlib.default_out_dir(quick))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.compile_modes is None:
        # Inductor on CPU compiles C++ for tens of seconds: not a seconds-long smoke run.
        cpu_quick = quick and not torch.cuda.is_available()
        args.compile_modes = [] if cpu_quick else ["max-autotune", "reduce-overhead", "default"]


class Recorder:
    """Completes rows (ratios to eager, roofline, compaction saving) and appends them as they are measured,
    so a run cut off by a time limit keeps what it finished."""

    def __init__(self, args, env: dict):
        self.out_dir = None if args.no_save else args.out_dir
        self.env = env
        self.rows: list[dict] = []
        self.flops_per_iter = None
        self.ceilings = None

    def __call__(self, rows: list[dict]) -> list[dict]:
        context = self.rows + rows
        benchlib.add_ratios(rows, self.flops_per_iter, self.ceilings, context)
        benchlib.add_compaction_saving(rows, context)
        if self.out_dir is not None and rows:
            benchlib.append_results(self.out_dir, "iters_per_sec", self.env, rows)
        self.rows += rows
        return rows


def make_plan(model, layer, args, device, flops_per_iter: float | None, budget: planner.Budget,
              record) -> planner.Plan:
    """``--budget-s``: measure the loop rates behind the plan (recorded as ``plan`` rows) and print them."""
    cost = None
    if flops_per_iter is not None:
        cost = planner.probe_loop_costs(model, layer, device, flops_per_iter, args.plan_probe_batch,
                                        compile_allowance_s=args.compile_allowance)
        record(cost.as_rows())
        print(f"# plan rates: {cost.describe()}", flush=True)
    return planner.Plan(cost, budget, printer=lambda line: print(line, flush=True))




def run(args) -> tuple[list[dict], dict]:
    budget = planner.Budget(args.budget_s)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = benchlib.environment(device)
    env.update(arch=args.arch, layer=args.layer)
    if args.tag:
        env["tag"] = args.tag
    if not args.compile_modes:
        args.providers = [n for n in args.providers if not n.startswith("compile")]
        args.profile_providers = [n for n in args.profile_providers if not n.startswith("compile")]
        env["compile_skipped"] = "torch.compile skipped: --quick on CPU (inductor's C++ build takes tens of s)"
    record = Recorder(args, env)
    model = prov.make_model(args.arch, device)
    sections = set(args.sections)
    if "roofline" in sections or {"throughput", "latency", "early-exit", "workload", "profile"} & sections:
        roof_rows, flops, record.ceilings = section_roofline.section_roofline(model, args.layer, args, device)
        record.flops_per_iter = flops["forward_plus_input_grad_flops"]
        record(roof_rows)
    plan = None
    if args.budget_s is not None:
        plan = make_plan(model, args.layer, args, device, record.flops_per_iter, budget, record)
    if "throughput" in sections:
        section_throughput.section_throughput(model, args.layer, args, device, record, plan)
    if "latency" in sections:
        section_throughput.section_latency(model, args.layer, args, device, record, plan)
    if {"early-exit", "workload"} & sections:
        reason = section_exit.exit_pilot_skip_reason(args, plan)
        if reason is not None:
            record([{"section": s, "provider": "all", "status": "skipped", "reason": reason}
                    for s in ("early-exit", "workload") if s in sections])
        else:
            exit_model, exit_layer, schedule, info, source = section_exit.exit_setup(model, args.layer, args, device)
            _log.info("exit schedule: %s", info)
            if "early-exit" in sections:
                section_exit.section_early_exit(exit_model, exit_layer, args, device, schedule, info, record, source, plan)
            if "workload" in sections:
                section_exit.section_workload(exit_model, exit_layer, args, device, schedule, info, record, source, plan)
    if "loss-kernel" in sections:
        record(section_loss_kernel.section_loss_kernel(args, device, plan))
    if "profile" in sections:
        section_profile.section_profile(model, args.layer, args, device, record, plan)
    return record.rows, env


def main(argv=None) -> int:
    args = parse_args(argv)
    benchlib.configure_logging(args.verbose)
    started = time.perf_counter()
    rows, env = run(args)
    wall_s = round(time.perf_counter() - started, 3)
    if not args.no_save:
        _log.info("appended %d rows to %s/iters_per_sec.{jsonl,csv}", len(rows), args.out_dir)
    skipped = [r for r in rows if r.get("status") != "ok" and r.get("reason")]
    print(f"# Active Defense benchmark: {env['arch']} prefix to {env['layer']} on "
          f"{env['gpu_name'] if env['device'] == 'cuda' else 'CPU'}; torch {env['torch']}, "
          f"triton {env['triton']}, CUDA {env['cuda']}; {env['date']}; {wall_s} s")
    flops = next((r for r in rows if r["provider"] == "flops-per-image-iteration"), None)
    if flops:
        print(f"# FLOPs per image-iteration (convolutions, forward + input gradient): "
              f"{flops['forward_plus_input_grad_flops']:.4g}")
    if env.get("compile_skipped"):
        print(f"# {env['compile_skipped']}")
    for r in skipped:
        print(f"# {r.get('section')}/{r['provider']} batch {r.get('batch', '-')}: {r['status']}: {r['reason']}")
    print(benchlib.format_table([r for r in rows if r.get("section") not in ("loss-kernel", "profile")],
                                TABLE_COLUMNS))
    kernel_rows = [r for r in rows if r.get("section") == "loss-kernel"]
    if kernel_rows:
        print(benchlib.format_table(kernel_rows, loss_kernel.TABLE_COLUMNS))
    profile_rows = [r for r in rows if r.get("section") == "profile"]
    if profile_rows:
        print(benchlib.format_table(profile_rows, section_profile.TABLE_COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
