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
  :func:`calibrate_exit_delta`): masking vs compaction, iteration spread,
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
import statistics
import sys
import time

import torch

from fsmooth.defense import DefenseConfig

import benchlib
import planner
import providers as prov

_log = logging.getLogger("bench.iters_per_sec")

SECTIONS = ("roofline", "throughput", "latency", "early-exit", "workload", "loss-kernel")
# eager first: every other row's ratio refers to it. torch.compile last: its compile time is the longest.
DEFAULT_PROVIDERS = ("eager", "eager-bf16", "fsmooth-eager", "graph-fp32", "graph-tf32", "graph-bf16",
                     "chunked-fp32", "chunked-tf32", "chunked-bf16", "compile", "compile-bf16")
EXIT_PROVIDERS = ("eager", "fsmooth-eager", "graph-bf16-nocompact", "graph-bf16", "chunked-bf16-nocompact",
                  "chunked-bf16", "graph-fp32-nocompact", "graph-fp32", "chunked-fp32-nocompact", "chunked-fp32")
QUICK_PROVIDERS = ("eager", "eager-bf16", "fsmooth-eager", "graph-bf16", "chunked-bf16", "compile")
# Error of the checked state against fp32 eager, relative to the eager update (see check_schedule).
# dL_F/dF is sign(F - mean) based: reduced precision flips the signs of elements near the mean, so a
# correct bf16 step lands 5-10 % off (seen on CPU); a wrong sign or scale lands at >= 1.
CHECK_TOLERANCE = {"fp32": 1e-2, "tf32": 0.2, "bf16": 0.25}
FIXED_DELTA = 1e-30  # "nobody exits": L_F of non-constant features never gets this small


# ----------------------------------------------------------------------------------------------
# Inputs and models


def make_model(arch: str, device: torch.device) -> torch.nn.Module:
    """An untrained WRN (random init, fixed seed) in eval mode; only the prefix's cost matters here."""
    import fsmooth.models as models
    torch.manual_seed(0)
    return models.build(arch).to(device).eval()


def make_start_points(batch: int, seed: int, device, sigma: float = 0.075) -> torch.Tensor:
    """Synthetic [0, 1] images plus the defense noise ``U(-sigma, sigma)``, drawn once for every provider.

    Each image is a per-sample base colour plus a random texture whose
    contrast varies across the batch (0 to 0.5), so samples start at different
    feature losses and converge at different rates (a spread of exit
    iterations; never zeros).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    base = torch.rand(batch, 3, 1, 1, generator=gen) * 0.6 + 0.2
    contrast = torch.rand(batch, 1, 1, 1, generator=gen) * 0.5
    x = (base + contrast * (torch.rand(batch, 3, 32, 32, generator=gen) - 0.5)).clamp_(0, 1)
    noise = (torch.rand(x.shape, generator=gen) * 2 - 1) * sigma
    return (x + noise).to(device)


def input_sets(batch: int, sets: int, seed: int, device, source=make_start_points) -> list[torch.Tensor]:
    return [source(batch, seed + 1000 * i + batch, device) for i in range(sets)]


def dataset_start_points(images: torch.Tensor):
    """Like :func:`make_start_points`, drawing (seeded) images from a uint8 ``(N, 3, 32, 32)`` dataset."""
    def source(batch: int, seed: int, device, sigma: float = 0.075) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x = images[torch.randint(len(images), (batch,), generator=gen)].float() / 255
        return (x + (torch.rand(x.shape, generator=gen) * 2 - 1) * sigma).to(device)
    return source


# ----------------------------------------------------------------------------------------------
# Measuring one provider


def reference_run(model, layer, schedule: prov.Schedule, t0: torch.Tensor) -> prov.RunOutput:
    """The fp32 eager loop (TF32 off): ground truth for every provider's check."""
    ref = prov.LoopProvider("eager", "fp32")
    ref.prepare(model, layer, schedule, t0)
    return ref.run(t0, schedule)


def compare(out: prov.RunOutput, ref: prov.RunOutput, t0: torch.Tensor) -> dict:
    """Final-state error relative to the eager update, and how many iteration counts differ."""
    update = (ref.inputs.double() - t0.double()).norm()
    diff = (out.inputs.double() - ref.inputs.double()).norm()
    return {"rel_err": float(diff / update.clamp_min(1e-30)),
            "iters_mismatch": int((out.iterations.cpu() != ref.iterations.cpu()).sum()),
            "finite": bool(torch.isfinite(out.inputs).all())}


def check_schedule(schedule: prov.Schedule, check_iters: int) -> prov.Schedule:
    """The first ``check_iters`` updates of ``schedule``.

    With beta=80 on an untrained network the loop is chaotic: rounding
    differences (TF32, bf16, another reduction order) grow over hundreds of
    iterations until final states share nothing, without either being wrong.
    A few updates test every part of the step (forward, loss, gradient,
    masked update, exit test) before that amplification.
    """
    return prov.Schedule(schedule.beta, schedule.delta, min(schedule.max_iters, check_iters))


def measure(provider, model, layer, schedule: prov.Schedule, sets: list[torch.Tensor], ref: prov.RunOutput,
            repeats: int, warmup: int, device, check: prov.Schedule | None = None) -> dict:
    """One row: a warm-up call, a check against ``ref`` (the fp32 eager loop from ``sets[0]`` under
    ``check``, default ``schedule``), then ``repeats`` timed calls rotating among ``sets``.

    Failures are recorded in the row (``status``/``reason``), never raised.
    """
    batch = sets[0].shape[0]
    check = check or schedule
    row = {"provider": provider.name, "dtype": provider.precision, "batch": batch, "iters": schedule.max_iters,
           "check_iters": check.max_iters}
    reason = provider.unavailable(torch.device(device))
    if reason is not None:
        return {**row, "status": "skipped", "reason": reason}
    try:
        provider.prepare(model, layer, schedule, sets[0])
        provider.run(sets[0], schedule)  # warm-up: compile / capture / autotune, excluded
        checked = compare(provider.run(sets[0], check), ref, sets[0])
        for _ in range(warmup):
            provider.run(sets[0], schedule)
        timing, outs = benchlib.time_repeated(lambda r: provider.run(sets[r % len(sets)], schedule), device,
                                              repeats, warmup=0)
    except Exception as exc:
        status = "oom" if benchlib.is_oom(exc) else "error"
        _log.warning("%s at batch %d: %s", provider.name, batch, benchlib.error_reason(exc))
        return {**row, "status": status, "reason": benchlib.error_reason(exc), **provider.describe()}
    finally:
        describe = provider.describe()
        provider.close()
        benchlib.release_memory(device)
    ok = checked["finite"] and checked["rel_err"] <= CHECK_TOLERANCE[provider.precision]
    useful = [int(o.iterations.sum()) for o in outs]
    rates = [u / (ms * 1e-3) for u, ms in zip(useful, timing.samples_ms)]
    occupancy = [o.occupancy for o in outs if o.occupancy is not None]
    return {**row, **timing.as_row(), **checked, **describe,
            "status": "ok" if ok else "check_failed",
            "reason": "" if ok else f"rel_err {checked['rel_err']:.3g} > {CHECK_TOLERANCE[provider.precision]}",
            "useful_iters": statistics.median(useful), "useful_iters_per_s": statistics.median(rates),
            "occupancy": statistics.median(occupancy) if occupancy else None,
            "iters_p50": float(outs[0].iterations.double().median()), "iters_max": int(outs[0].iterations.max())}


def add_ratios(rows: list[dict], flops_per_iter: float | None, ceilings: dict | None,
               context: list[dict] | None = None) -> None:
    """Speedup over ``eager`` at the same section/batch/iters (looked up in ``context``, default ``rows``),
    achieved FLOP/s and roofline fractions."""
    eager = {(r.get("section"), r["batch"], r["iters"]): r for r in (context or rows)
             if r["provider"] == "eager" and r.get("useful_iters_per_s")}
    for r in rows:
        rate = r.get("useful_iters_per_s")
        if not rate:
            continue
        base = eager.get((r.get("section"), r["batch"], r["iters"]))
        if base is not None:
            if r.get("section") == "latency":
                r["speedup_vs_eager"] = base["median_ms"] / r["median_ms"]
            else:
                r["speedup_vs_eager"] = rate / base["useful_iters_per_s"]
        per_iter = r.get("model_flops_per_iter") or flops_per_iter  # the exit model may be another network
        if per_iter and ceilings:
            r["flops_per_s"] = rate * per_iter
            r["roofline_fraction"] = r["flops_per_s"] / ceilings[r["dtype"]]["flops_per_s"]
            r["fraction_of_bf16_peak"] = r["flops_per_s"] / ceilings["bf16"]["flops_per_s"]
            r["fraction_of_tf32_peak"] = r["flops_per_s"] / ceilings["tf32"]["flops_per_s"]


def sweep(section: str, names, model, layer, schedule, batches, args, device, record, extra=None,
          source=make_start_points, plan: planner.Plan | None = None) -> list[dict]:
    """Every provider at every batch size with one schedule, in the order given (batch-major).

    Each row goes to ``record`` when measured (a row gets its ratio to ``eager`` when the eager row of its
    batch came earlier). With a ``plan``: every row's planned seconds are printed before the first runs,
    and a row that would overrun the budget is recorded as skipped (later, cheaper rows still run).
    """
    check = check_schedule(schedule, args.check_iters)
    jobs = [(batch, provider) for batch in batches
            for provider in prov.build_providers(list(names), tuple(args.compile_modes))]
    planned = []
    if plan is not None:
        calls = 1 + args.warmup + args.repeats
        unavailable = {p.name: p.unavailable(torch.device(device)) for _, p in jobs}
        # + the check run and the fp32 eager reference, check.max_iters iterations each
        planned = [0.0 if unavailable[p.name] else
                   plan.cost.provider_s(p, b, schedule.max_iters, calls, exit_work_fraction(p, extra, schedule))
                   + plan.cost.loop_s("fp32", b, check.max_iters, 2)
                   for b, p in jobs]
        plan.announce(f"{section} ({schedule.max_iters} iterations per call, {calls} calls per row)",
                      [(f"{p.name} batch {b}" + (" (unavailable here)" if unavailable[p.name] else ""), s)
                       for (b, p), s in zip(jobs, planned)])
    rows, inputs = [], None  # inputs: (batch, input sets, eager reference) of the batch being measured
    for i, (batch, provider) in enumerate(jobs):
        base = {"section": section, "provider": provider.name, "dtype": provider.precision, "batch": batch,
                "iters": schedule.max_iters}
        if plan is not None and planned[i] > 0:  # 0: unavailable here, measure() records why
            base["planned_s"] = round(planned[i], 3)
            reason = plan.skip_reason(planned[i])
            if reason is not None:
                rows += record([{**base, "status": "skipped", "reason": reason, **(extra or {})}])
                continue
        if inputs is None or inputs[0] != batch:
            inputs = None
            benchlib.release_memory(device)
            sets = input_sets(batch, args.input_sets, args.seed, device, source)
            inputs = (batch, sets, reference_run(model, layer, check, sets[0]))
        _log.info("%s: %s batch %d, %d iters", section, provider.name, batch, schedule.max_iters)
        started = time.perf_counter()
        row = measure(provider, model, layer, schedule, inputs[1], inputs[2], args.repeats, args.warmup, device,
                      check)
        rows += record([{**base, **row, "wall_s": round(time.perf_counter() - started, 3), **(extra or {})}])
    inputs = None
    benchlib.release_memory(device)
    return rows


# ----------------------------------------------------------------------------------------------
# Sections


def section_roofline(model, layer, args, device) -> tuple[list[dict], dict, dict]:
    import fsmooth.models as models
    module = models.prefix(model, layer)
    flops = benchlib.count_flops(module, torch.rand(1, 3, 32, 32, device=device))
    ceilings = benchlib.device_ceilings(device, args.matmul_size, args.copy_bytes)
    rows = [{"section": "roofline", "provider": "flops-per-image-iteration", "status": "ok", "dtype": "-",
             "batch": 1, "iters": 1, "shape": "1x3x32x32", **flops}]
    for key in ("bf16", "tf32", "fp32"):
        c = ceilings[key]
        rows.append({"section": "roofline", "provider": f"matmul-{key}", "status": "ok", "dtype": key,
                     "shape": f"{c['size']}^3", **{k: v for k, v in c.items() if k != "size"}})
    c = ceilings["copy"]
    rows.append({"section": "roofline", "provider": "copy", "status": "ok", "dtype": "fp32",
                 "shape": str(c["copy_bytes"]), **c})
    return rows, flops, ceilings


def probe_largest_batch(name: str, model, layer, start: int, cap: int, args, device) -> tuple[int | None, list]:
    """Double the batch from ``start`` until provider ``name`` runs out of memory (or ``cap``)."""
    largest, notes = None, []
    batch = start
    schedule = prov.Schedule(args.beta, FIXED_DELTA, 2)
    while batch <= cap:
        provider = prov.build_providers([name], tuple(args.compile_modes))[0]
        reason = provider.unavailable(torch.device(device))
        if reason:
            notes.append(f"{name}: {reason}")
            break
        try:
            t0 = make_start_points(batch, args.seed, device)
            provider.prepare(model, layer, schedule, t0)
            provider.run(t0, schedule)
            largest = batch
        except Exception as exc:
            notes.append(f"batch {batch}: {benchlib.error_reason(exc, 120)}")
            break
        finally:
            provider.close()
            benchlib.release_memory(device)
        batch *= 2
    return largest, notes


def section_throughput(model, layer, args, device, record, plan=None) -> list[dict]:
    """Fixed-schedule sweep over ``--batches``, then the largest batch that fits with ``--max-batch-providers``.

    The eager baselines are not run at the largest batch by default: at
    thousands of samples one eager call takes minutes (they are compared at
    the listed batch sizes). The largest-batch probe doubles until memory
    runs out, which no plan can bound: it does not run under ``--budget-s``.
    """
    schedule = prov.Schedule(args.beta, FIXED_DELTA, args.iters)
    rows = sweep("throughput", args.providers, model, layer, schedule, list(args.batches), args, device, record,
                 plan=plan)
    if args.max_batch_probe and plan is not None:
        rows += record([{"section": "throughput", "provider": f"probe:{args.max_batch_probe}", "iters": 2,
                         "status": "skipped", "reason": "the largest-batch probe is not planned: it runs "
                                                        "without --budget-s"}])
    elif args.max_batch_probe and torch.device(device).type == "cuda":
        largest, notes = probe_largest_batch(args.max_batch_probe, model, layer, 2 * max(args.batches),
                                             args.max_batch_cap, args, device)
        _log.info("largest batch for %s: %s (%s)", args.max_batch_probe, largest, "; ".join(notes))
        rows += record([{"section": "throughput", "provider": f"probe:{args.max_batch_probe}", "batch": largest,
                         "iters": 2, "status": "ok" if largest else "error", "reason": "; ".join(notes)}])
        if largest:
            rows += sweep("throughput", args.max_batch_providers, model, layer, schedule, [largest], args, device,
                          record)
    return rows


def section_latency(model, layer, args, device, record, plan=None) -> list[dict]:
    schedule = prov.Schedule(args.beta, FIXED_DELTA, args.latency_iters)
    return sweep("latency", args.providers, model, layer, schedule, args.latency_batches, args, device, record,
                 plan=plan)


def first_exit_iterations(losses: torch.Tensor, delta: float, max_iters: int) -> torch.Tensor:
    """Updates each sample takes before ``L_F <= delta`` given its loss trajectory ``(B, steps)``."""
    below = losses <= delta
    hit = torch.where(below.any(1), below.float().argmax(1), torch.full_like(below[:, 0], max_iters, dtype=torch.long))
    return hit.clamp(max=max_iters)


def calibrate_exit_delta(model, layer, args, device) -> tuple[prov.Schedule, dict]:
    """The documented synthetic exit schedule.

    The benchmark model is untrained, and with the paper's beta=80 its feature
    loss oscillates instead of decreasing, so nothing would exit. Instead:
    ``beta = --exit-beta`` (2 by default; the loss then decreases steadily), a
    pilot run of the fp32 eager loop records ``--pilot-batch`` loss
    trajectories for ``--exit-iters`` updates, and ``delta`` is the threshold
    at which the median sample exits after ``--exit-median`` x ``exit-iters``
    updates. Samples with different texture contrast converge at different
    rates, which spreads the exit iterations (reported as percentiles).
    """
    pilot = prov.Schedule(args.exit_beta, FIXED_DELTA, args.exit_iters)
    t0 = make_start_points(args.pilot_batch, args.seed + 7, device)
    loss_fn = prov.make_loss_fn(prov.frozen_prefix(model, layer, torch.float32), torch.float32)
    with benchlib.float32_matmul("ieee"):
        _, _, losses = prov.masked_loop(loss_fn, t0, pilot, record_losses=True)
    losses = losses.float().cpu()
    target = args.exit_median * args.exit_iters
    candidates = torch.unique(losses[:, 1:].flatten())
    step = max(1, candidates.numel() // 2000)
    best, best_gap = None, float("inf")
    for delta in candidates[::step].tolist():
        gap = abs(float(first_exit_iterations(losses, delta, args.exit_iters).double().median()) - target)
        if gap < best_gap:
            best, best_gap = delta, gap
    best = max(best, FIXED_DELTA)
    hits = first_exit_iterations(losses, best, args.exit_iters).double()
    info = {"exit_beta": args.exit_beta, "exit_delta": best, "pilot_batch": args.pilot_batch,
            "pilot_iters_p10": float(hits.quantile(0.1)), "pilot_iters_p50": float(hits.median()),
            "pilot_iters_mean": float(hits.mean()),
            "pilot_iters_p90": float(hits.quantile(0.9)), "pilot_iters_max": float(hits.max())}
    return prov.Schedule(args.exit_beta, best, args.exit_iters), info


def exit_setup(model, layer, args, device):
    """``(model, layer, schedule, info, source)`` of the early-exit sections (``--exit-model``).

    ``synthetic``: the benchmark's untrained model with :func:`calibrate_exit_delta`.
    ``pretrained``: a trained model embedded in the repository (``fsmooth.models.pretrained``) at the
    calibrated beta and delta (``DefenseConfig.for_model``), on CIFAR-10 test images when ``--data`` is given (else the
    synthetic textures); falls back to ``synthetic`` (saying why in the rows) when none is embedded.
    """
    fallback = ""
    if args.exit_model == "pretrained":
        import fsmooth.models as models
        try:
            names = models.available_pretrained()
            name = args.exit_pretrained or (names[0] if names else None)
            if name is None:
                raise LookupError("no pretrained model is embedded in this checkout")
            trained = models.pretrained(name, device=device).eval()
        except Exception as exc:
            fallback = f"pretrained unavailable ({benchlib.error_reason(exc, 150)}); "
            _log.warning("early exit: %s falling back to the synthetic schedule", fallback)
        else:
            config = DefenseConfig.for_model(trained)
            source, data = make_start_points, "synthetic textures"
            if args.data:
                from fsmooth.data import load_dataset
                source, data = dataset_start_points(load_dataset(args.data, "test")[0]), "CIFAR-10 (JPEG q75 copy)"
            flops = benchlib.count_flops(models.prefix(trained, None), torch.rand(1, 3, 32, 32, device=device))
            info = {"exit_model": f"pretrained:{name}", "exit_beta": config.beta, "exit_delta": config.delta,
                    "exit_inputs": data, "model_flops_per_iter": flops["forward_plus_input_grad_flops"]}
            return trained, None, prov.Schedule(config.beta, config.delta, args.exit_iters), info, source
    schedule, info = calibrate_exit_delta(model, layer, args, device)
    info = {"exit_model": fallback + f"synthetic:{args.arch}", "exit_inputs": "synthetic textures", **info}
    return model, layer, schedule, info, make_start_points


def section_early_exit(model, layer, args, device, schedule, info, record, source, plan=None) -> list[dict]:
    return sweep("early-exit", args.exit_providers, model, layer, schedule, args.exit_batches, args, device,
                 record, extra=info, source=source, plan=plan)


def add_compaction_saving(rows: list[dict], context: list[dict] | None = None) -> None:
    """``1 - t(compacting engine) / t(same engine, masking only)`` on the compacting engine's row."""
    by_key = {(r.get("section"), r["provider"], r.get("batch")): r for r in (context or rows)}
    for r in rows:
        masked = by_key.get((r.get("section"), r["provider"] + "-nocompact", r.get("batch")))
        if masked and r.get("median_ms") and masked.get("median_ms"):
            r["compaction_saving"] = 1.0 - r["median_ms"] / masked["median_ms"]


def _workload_modes(args, device) -> list[tuple[str, str, int | None]]:
    """(mode, provider name, chunk size or None for one call) for the first available engine."""
    for engine in ("graph", "chunked"):
        name = f"{engine}-{args.workload_precision}"
        reason = prov.build_providers([name])[0].unavailable(torch.device(device))
        if reason is None:
            return [("masking", f"{name}-nocompact", args.workload_batch),
                    ("compaction", name, args.workload_batch),
                    ("continuous", name, None)]
    return [("masking", "eager", args.workload_batch), ("compaction", "fsmooth-eager", args.workload_batch)]


def exit_work_fraction(provider, info: dict | None, schedule: prov.Schedule) -> float:
    """Planned share of ``max_iters`` that an early-exit call executes.

    A masked batch (the eager loop, an engine with ``compact=False``) runs until its slowest sample exits:
    all of it. An engine that drops or compacts exited samples executes about the samples' mean exit
    iteration, measured by the exit schedule's pilot run (``pilot_iters_mean``), plus 25 % for bucket
    rounding; without a pilot, all of it.
    """
    mean = (info or {}).get("pilot_iters_mean")
    drops_exited = isinstance(provider, prov.EngineProvider) and provider.options.get("compact", True)
    if mean is None or not drops_exited or schedule.max_iters <= 0:
        return 1.0
    return min(1.0, 1.25 * mean / schedule.max_iters)


def workload_planned_s(cost: planner.CostModel, provider, n: int, slots: int, schedule: prov.Schedule,
                       repeats: int, info: dict | None = None) -> float:
    """A workload row's planned seconds: one untimed call on ``slots`` inputs (with capture or compile), then
    ``repeats`` passes over the ``n`` inputs ``slots`` at a time (chunks, or the slots of one
    continuous-batching call), each executing :func:`exit_work_fraction` of ``max_iters``."""
    passes = -(-n // slots)
    fraction = exit_work_fraction(provider, info, schedule)
    return (cost.provider_s(provider, slots, schedule.max_iters, 1, fraction)
            + fraction * cost.loop_s(provider.precision, slots, schedule.max_iters, calls=passes * repeats))


def section_workload(model, layer, args, device, schedule, info, record, source, plan=None) -> list[dict]:
    """``--workload-size`` inputs: per-chunk masking and compaction, and one continuous-batching call."""
    n = args.workload_size
    modes = [(mode, prov.build_providers([name], tuple(args.compile_modes))[0], chunk)
             for mode, name, chunk in _workload_modes(args, device)]
    planned = [workload_planned_s(plan.cost, provider, n, chunk or args.workload_batch, schedule,
                                  args.workload_repeats, info) if plan else None
               for _, provider, chunk in modes]
    if plan is not None:
        plan.announce(f"workload ({n} inputs, at most {schedule.max_iters} iterations each)",
                      [(f"{mode}:{provider.name}", s) for (mode, provider, _), s in zip(modes, planned)])
    inputs = None
    rows = []
    for (mode, provider, chunk), planned_s in zip(modes, planned):
        name = provider.name
        row = {"section": "workload", "provider": f"{mode}:{name}", "dtype": provider.precision, "batch": n,
               "iters": schedule.max_iters, **info}
        reason = provider.unavailable(torch.device(device))
        if reason is None and plan is not None:
            row["planned_s"] = round(planned_s, 3)
            reason = plan.skip_reason(planned_s)
        if reason:
            rows += record([{**row, "status": "skipped", "reason": reason}])
            continue
        if inputs is None:
            inputs = torch.cat([source(min(4096, n - i), args.seed + 31 + i, device) for i in range(0, n, 4096)])
        slots = chunk or args.workload_batch
        pieces = [inputs[i:i + chunk] for i in range(0, n, chunk)] if chunk else [inputs]
        started = time.perf_counter()
        try:
            provider.prepare(model, layer, schedule, inputs[:slots])
            provider.run(inputs[:slots], schedule)  # warm-up / capture, excluded
            samples, outs = [], []
            for _ in range(args.workload_repeats):
                ms, outs = benchlib.time_once(lambda: [provider.run(p, schedule) for p in pieces], device)
                samples.append(ms)
        except Exception as exc:
            rows += record([{**row, "status": "oom" if benchlib.is_oom(exc) else "error",
                             "reason": benchlib.error_reason(exc)}])
            continue
        finally:
            describe = provider.describe()
            provider.close()
            benchlib.release_memory(device)
        timing = benchlib.Timing(samples)
        iters = torch.cat([o.iterations.cpu() for o in outs])
        useful = int(iters.sum())
        reported = [o.occupancy for o in outs if o.occupancy is not None]
        if reported and len(reported) == len(outs):
            # Engine-reported occupancy, weighted by each piece's useful work.
            executed = sum(int(o.iterations.sum()) / max(o.occupancy, 1e-12) for o in outs)
            occupancy = useful / executed if executed else None
        elif mode == "masking":
            # A masked batch runs every slot until its slowest sample exits.
            occupancy = useful / max(1, sum(int(o.iterations.max()) * o.iterations.numel() for o in outs))
        else:
            occupancy = None  # not reported by this engine
        rows += record([{**row, **timing.as_row(), **describe, "status": "ok", "useful_iters": useful,
                         "useful_iters_per_s": useful / (timing.median_ms * 1e-3), "occupancy": occupancy,
                         "iters_p50": float(iters.double().median()), "iters_max": int(iters.max()),
                         "slots": slots, "wall_s": round(time.perf_counter() - started, 3)}])
    return rows


def section_loss_kernel(args, device, plan=None) -> list[dict]:
    """``bench/loss_kernel.py``'s shapes in fp32 and bf16. Planned from ``do_bench``'s time budget per
    measurement (warm-up + repetitions), doubled for the float64 checks and the input generation."""
    import loss_kernel
    shapes = loss_kernel.QUICK_SHAPES if args.quick else loss_kernel.FULL_SHAPES
    rep_ms = 20.0 if args.quick else 100.0
    dtypes = ["fp32", "bf16"]
    if plan is not None:
        measurements = len(shapes) * len(dtypes) * 2  # Triton and the reference
        planned_s = 2 * measurements * (25.0 + rep_ms) * 1e-3
        plan.announce("loss-kernel", [(f"{len(shapes)} shapes x {dtypes} x 2 providers", planned_s)])
        reason = plan.skip_reason(planned_s)
        if reason is not None:
            return [{"section": "loss-kernel", "provider": "all", "status": "skipped", "reason": reason,
                     "planned_s": round(planned_s, 3)}]
    rows, _ = loss_kernel.run(shapes, dtypes, device, args.input_sets, args.seed, rep_ms, args.copy_bytes)
    return rows


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
        repeats=2 if quick else 5,
        warmup=0 if quick else 1,
        matmul_size=128 if quick else 8192,
        copy_bytes=(4 << 20) if quick else (1 << 30),
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
        add_ratios(rows, self.flops_per_iter, self.ceilings, context)
        add_compaction_saving(rows, context)
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


def _exit_pilot_skip_reason(args, plan: planner.Plan | None) -> str | None:
    """The synthetic exit schedule needs a pilot run of the fp32 eager loop: plan it like a row."""
    if plan is None or args.exit_model != "synthetic":
        return None
    pilot_s = plan.cost.loop_s("fp32", args.pilot_batch, args.exit_iters)
    plan.announce("exit-schedule pilot (fp32 eager loop)", [(f"eager batch {args.pilot_batch}", pilot_s)])
    reason = plan.skip_reason(pilot_s)
    return None if reason is None else f"the exit schedule's pilot run does not fit: {reason}"


def run(args) -> tuple[list[dict], dict]:
    budget = planner.Budget(args.budget_s)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = benchlib.environment()
    env.update(arch=args.arch, layer=args.layer)
    if args.tag:
        env["tag"] = args.tag
    if not args.compile_modes:
        args.providers = [n for n in args.providers if not n.startswith("compile")]
        env["compile_skipped"] = "torch.compile skipped: --quick on CPU (inductor's C++ build takes tens of s)"
    record = Recorder(args, env)
    model = make_model(args.arch, device)
    sections = set(args.sections)
    if "roofline" in sections or {"throughput", "latency", "early-exit", "workload"} & sections:
        roof_rows, flops, record.ceilings = section_roofline(model, args.layer, args, device)
        record.flops_per_iter = flops["forward_plus_input_grad_flops"]
        record(roof_rows)
    plan = None
    if args.budget_s is not None:
        plan = make_plan(model, args.layer, args, device, record.flops_per_iter, budget, record)
    if "throughput" in sections:
        section_throughput(model, args.layer, args, device, record, plan)
    if "latency" in sections:
        section_latency(model, args.layer, args, device, record, plan)
    if {"early-exit", "workload"} & sections:
        reason = _exit_pilot_skip_reason(args, plan)
        if reason is not None:
            record([{"section": s, "provider": "all", "status": "skipped", "reason": reason}
                    for s in ("early-exit", "workload") if s in sections])
        else:
            exit_model, exit_layer, schedule, info, source = exit_setup(model, args.layer, args, device)
            _log.info("exit schedule: %s", info)
            if "early-exit" in sections:
                section_early_exit(exit_model, exit_layer, args, device, schedule, info, record, source, plan)
            if "workload" in sections:
                section_workload(exit_model, exit_layer, args, device, schedule, info, record, source, plan)
    if "loss-kernel" in sections:
        record(section_loss_kernel(args, device, plan))
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
    print(benchlib.format_table([r for r in rows if r.get("section") != "loss-kernel"], TABLE_COLUMNS))
    kernel_rows = [r for r in rows if r.get("section") == "loss-kernel"]
    if kernel_rows:
        import loss_kernel
        print(benchlib.format_table(kernel_rows, loss_kernel.TABLE_COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
