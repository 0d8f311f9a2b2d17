"""``early-exit`` and ``workload`` sections of ``iters_per_sec.py``: a documented exit schedule (synthetic, or
the embedded trained model's calibrated one), masking vs compaction vs continuous batching."""
from __future__ import annotations

import logging
import time

import torch

import fsmooth.models as models
from fsmooth.data import load_dataset
from fsmooth.defense import DefenseConfig

import benchlib
import planner
import providers as prov

_log = logging.getLogger("bench.section_exit")


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
    pilot = prov.Schedule(args.exit_beta, prov.FIXED_DELTA, args.exit_iters)
    t0 = prov.make_start_points(args.pilot_batch, args.seed + 7, device)
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
    best = max(best, prov.FIXED_DELTA)
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
            source, data = prov.make_start_points, "synthetic textures"
            if args.data:
                source, data = prov.dataset_start_points(load_dataset(args.data, "test")[0]), "CIFAR-10 (JPEG q75 copy)"
            flops = benchlib.count_flops(models.prefix(trained, None), torch.rand(1, 3, 32, 32, device=device))
            info = {"exit_model": f"pretrained:{name}", "exit_beta": config.beta, "exit_delta": config.delta,
                    "exit_inputs": data, "model_flops_per_iter": flops["forward_plus_input_grad_flops"]}
            return trained, None, prov.Schedule(config.beta, config.delta, args.exit_iters), info, source
    schedule, info = calibrate_exit_delta(model, layer, args, device)
    info = {"exit_model": fallback + f"synthetic:{args.arch}", "exit_inputs": "synthetic textures", **info}
    return model, layer, schedule, info, prov.make_start_points


def exit_pilot_skip_reason(args, plan: planner.Plan | None) -> str | None:
    """The synthetic exit schedule needs a pilot run of the fp32 eager loop: plan it like a row."""
    if plan is None or args.exit_model != "synthetic":
        return None
    pilot_s = plan.cost.loop_s("fp32", args.pilot_batch, args.exit_iters)
    plan.announce("exit-schedule pilot (fp32 eager loop)", [(f"eager batch {args.pilot_batch}", pilot_s)])
    reason = plan.skip_reason(pilot_s)
    return None if reason is None else f"the exit schedule's pilot run does not fit: {reason}"


def section_early_exit(model, layer, args, device, schedule, info, record, source, plan=None) -> list[dict]:
    return prov.sweep("early-exit", args.exit_providers, model, layer, schedule, args.exit_batches, args, device,
                 record, extra=info, source=source, plan=plan)


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


def section_workload(model, layer, args, device, schedule, info, record, source, plan=None) -> list[dict]:
    """``--workload-size`` inputs: per-chunk masking and compaction, and one continuous-batching call."""
    n = args.workload_size
    modes = [(mode, prov.build_providers([name], tuple(args.compile_modes))[0], chunk)
             for mode, name, chunk in _workload_modes(args, device)]
    planned = [planner.workload_planned_s(plan.cost, provider, n, chunk or args.workload_batch, schedule,
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
