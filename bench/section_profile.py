"""``profile`` section of ``iters_per_sec.py``: where one defense call's device time goes, per kind of kernel
and per kernel, for a few providers at one batch (``torch.profiler``).

Answers "which kernels dominate" where a target is missed (graph-bf16 against torch.compile and the bf16
matrix rate): each provider runs its warm-up call, then one profiled call of ``--profile-iters`` fixed
iterations (nobody exits). On CUDA the rows are kernel times (CUPTI reports the kernels replayed inside a CUDA
graph; a WHILE loop's trips may be missed, pytorch/kineto#1062, though on an H200 with torch 2.11 they were all
recorded: a row whose kernels cover under ``PARTIAL_SHARE`` of its wall time is marked ``partial``, and
``chunked-*`` shows the same kernels as ``graph-*``; a provider whose kernels are not seen gets ``status``
``no_kernels`` rather than a table of zeros); on CPU, the self times of the operators (a smoke test of the section, not a profile of anything).
"""
from __future__ import annotations

import logging
import re
import time

import torch

import benchlib
import providers as prov

_log = logging.getLogger("bench.section_profile")

# (category, pattern), first match wins; searched case-insensitively in the kernel (or operator) name.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("fsmooth loss (Triton)", r"_partial_sum_kernel|_absdev_sign_kernel|_grad_kernel"),
    ("inductor fused (Triton)", r"^triton_|^triton\w*_(poi|red|per|tem)_"),
    ("convolution", r"conv|scudnn|xmma|implicit_?gemm|fprop|dgrad|wgrad|winograd|cutlass|gemm|cudnn::.*(fft|conv)"),
    ("batch norm", r"bn_|batch_?norm"),
    ("layout / copy", r"nchwtonhwc|nhwctonchw|transpose|copy|memcpy|memset|cat_|index"),
    ("reduction", r"reduce|sum|mean"),
    ("elementwise", r"elementwise|vectorized|unrolled|pointwise|relu|add|mul|div|where|clamp|sign|abs|sub"),
)
TOP_KERNELS = 12
# Below this share of the profiled call's wall time, the kernels seen are marked ``partial``: the profiler may
# record only the first trip of a CUDA graph WHILE loop (pytorch/kineto#1062), which would leave the graph
# engine's profile a fraction of its kernels (on an H200 with torch 2.11 it recorded them all: 2026-11-26).
PARTIAL_SHARE = 0.3
TABLE_COLUMNS = (("provider", "provider", ""), ("dtype", "prec", ""), ("batch", "batch", ""),
                 ("iters", "iters", ""), ("status", "status", ""), ("category", "what", ""), ("device_ms", "device ms", ".4g"),
                 ("share", "share", ".1%"), ("calls", "calls", ""), ("kernel", "kernel", ""))


def categorize(name: str) -> str:
    """The kind of a kernel or operator, from its name (``other`` when no pattern matches)."""
    for category, pattern in CATEGORIES:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return category
    return "other"


def _self_time_us(event, device_type: str) -> float:
    if device_type == "cuda":
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(event, attr):
                return float(getattr(event, attr))
        return 0.0
    return float(event.self_cpu_time_total)


def kernel_times(prof, device_type: str) -> list[tuple[str, float, int]]:
    """``(name, self time ms, calls)`` of the device kernels (CUDA) or operators (CPU), largest first."""
    out = []
    for event in prof.key_averages():
        if device_type == "cuda":
            if str(getattr(event, "device_type", "")).split(".")[-1] != "CUDA":
                continue
        elif event.key.startswith(("ProfilerStep", "[")):
            continue
        ms = _self_time_us(event, device_type) / 1e3
        if ms > 0:
            out.append((event.key, ms, int(event.count)))
    return sorted(out, key=lambda item: -item[1])


def breakdown_rows(base: dict, kernels: list[tuple[str, float, int]], top: int = TOP_KERNELS) -> list[dict]:
    """A ``total`` row, one row per category (largest first), then the ``top`` kernels."""
    total = sum(ms for _, ms, _ in kernels)
    by_category: dict[str, list[float]] = {}
    for name, ms, calls in kernels:
        entry = by_category.setdefault(categorize(name), [0.0, 0])
        entry[0] += ms
        entry[1] += calls
    rows = [{**base, "category": "total", "device_ms": total, "share": 1.0 if total else None,
             "calls": sum(c for _, _, c in kernels)}]
    for category, (ms, calls) in sorted(by_category.items(), key=lambda item: -item[1][0]):
        rows.append({**base, "category": category, "device_ms": ms, "share": ms / total, "calls": calls})
    for name, ms, calls in kernels[:top]:
        rows.append({**base, "category": f"kernel: {categorize(name)}", "kernel": name[:110], "device_ms": ms,
                     "share": ms / total, "calls": calls})
    return rows


def profile_provider(provider, model, layer, schedule, t0, device) -> tuple[list[tuple[str, float, int]], float]:
    """Warm-up call, then one profiled call; returns the kernel times and the profiled call's wall ms."""
    from torch.profiler import ProfilerActivity, profile

    device_type = torch.device(device).type
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    provider.prepare(model, layer, schedule, t0)
    provider.run(t0, schedule)  # warm-up: compile, capture, autotune
    benchlib.synchronize(device)
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        provider.run(t0, schedule)
        benchlib.synchronize(device)
        wall_ms = (time.perf_counter() - started) * 1e3
    return kernel_times(prof, device_type), wall_ms


def section_profile(model, layer, args, device, record, plan=None) -> list[dict]:
    """``--profile-providers`` at ``--profile-batch``, ``--profile-iters`` fixed iterations each."""
    schedule = prov.Schedule(args.beta, prov.FIXED_DELTA, args.profile_iters)
    batch = args.profile_batch
    providers = prov.build_providers(list(args.profile_providers), tuple(args.compile_modes))
    planned = {}
    if plan is not None:
        planned = {p.name: plan.cost.provider_s(p, batch, schedule.max_iters, 2, 1.0) for p in providers}
        plan.announce(f"profile ({schedule.max_iters} iterations, a warm-up and a profiled call per row)",
                      [(f"{p.name} batch {batch}", planned[p.name]) for p in providers])
    rows = []
    t0 = prov.make_start_points(batch, args.seed, device)
    for provider in providers:
        base = {"section": "profile", "provider": provider.name, "dtype": provider.precision, "batch": batch,
                "iters": schedule.max_iters}
        if provider.name in planned:
            base["planned_s"] = round(planned[provider.name], 3)
            reason = plan.skip_reason(planned[provider.name])
            if reason is not None:
                rows += record([{**base, "status": "skipped", "reason": reason}])
                continue
        reason = provider.unavailable(torch.device(device))
        if reason is not None:
            rows += record([{**base, "status": "skipped", "reason": reason}])
            continue
        started = time.perf_counter()
        try:
            kernels, wall_ms = profile_provider(provider, model, layer, schedule, t0, device)
        except Exception as exc:
            _log.warning("profile of %s failed: %s", provider.name, benchlib.error_reason(exc))
            rows += record([{**base, "status": "oom" if benchlib.is_oom(exc) else "error",
                             "reason": benchlib.error_reason(exc), **provider.describe()}])
            continue
        finally:
            describe = provider.describe()
            provider.close()
            benchlib.release_memory(device)
        base.update(describe, profiled_wall_ms=round(wall_ms, 3), wall_s=round(time.perf_counter() - started, 3))
        if not kernels:
            rows += record([{**base, "status": "no_kernels", "category": "total",
                             "reason": "the profiler recorded no kernel of this provider"}])
            continue
        status, reason = "ok", ""
        covered = sum(ms for _, ms, _ in kernels) / wall_ms if wall_ms > 0 else 0.0
        if torch.device(device).type == "cuda" and covered < PARTIAL_SHARE:
            status = "partial"
            reason = (f"the kernels seen add up to {covered:.0%} of the call's wall time: the profiler missed "
                      "some (a CUDA graph WHILE loop's later trips, say)")
        rows += record([{**row, "status": status, "reason": reason} for row in breakdown_rows(base, kernels)])
    return rows
