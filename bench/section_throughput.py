"""``throughput`` and ``latency`` sections of ``iters_per_sec.py``: a fixed schedule (nobody exits) swept
over batch sizes, and the largest batch that fits."""
from __future__ import annotations

import logging

import torch

import benchlib
import providers as prov

_log = logging.getLogger("bench.section_throughput")


def probe_largest_batch(name: str, model, layer, start: int, cap: int, args, device) -> tuple[int | None, list]:
    """Double the batch from ``start`` until provider ``name`` runs out of memory (or ``cap``)."""
    largest, notes = None, []
    batch = start
    schedule = prov.Schedule(args.beta, prov.FIXED_DELTA, 2)
    while batch <= cap:
        provider = prov.build_providers([name], tuple(args.compile_modes))[0]
        reason = provider.unavailable(torch.device(device))
        if reason:
            notes.append(f"{name}: {reason}")
            break
        try:
            t0 = prov.make_start_points(batch, args.seed, device)
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
    """Fixed-schedule prov.sweep over ``--batches``, then the largest batch that fits with ``--max-batch-providers``.

    The eager baselines are not run at the largest batch by default: at
    thousands of samples one eager call takes minutes (they are compared at
    the listed batch sizes). The largest-batch probe doubles until memory
    runs out, which no plan can bound: it does not run under ``--budget-s``.
    """
    schedule = prov.Schedule(args.beta, prov.FIXED_DELTA, args.iters)
    rows = prov.sweep("throughput", args.providers, model, layer, schedule, list(args.batches), args, device, record,
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
            rows += prov.sweep("throughput", args.max_batch_providers, model, layer, schedule, [largest], args, device,
                          record)
    return rows


def section_latency(model, layer, args, device, record, plan=None) -> list[dict]:
    schedule = prov.Schedule(args.beta, prov.FIXED_DELTA, args.latency_iters)
    return prov.sweep("latency", args.providers, model, layer, schedule, args.latency_batches, args, device, record,
                 plan=plan)
