"""Planned run times from FLOPs and measured rates, and a time budget that skips what would overrun.

GPU time comes in commands of at most 10 minutes, so a benchmark run with ``--budget-s`` plans each row
before running it and skips (with the reason, in the row) the rows that would not end in time; the rows
are run in the order given, headline rows first, and a skipped row does not stop the cheaper rows after it.

The plan is measured, never assumed: :func:`probe_loop_costs` times the plain eager loop (the
``eager`` / ``eager-bf16`` providers' loop) at batch 1 and at ``probe_batch`` for a few iterations, in fp32
(TF32 off) and in bf16, and fits ``seconds per iteration = fixed_s + batch * per_image_s`` per precision.
``flops_per_iter / per_image_s`` is the measured rate in FLOP/s. A row of ``calls`` calls of ``iters``
iterations at batch ``b`` is planned at ``calls * iters * (fixed_s + b * per_image_s)``, plus a measured
per-row setup (a copy of the prefix and its first call), the warm-up and capture of every bucket for the
CUDA-graph engines, and a compile allowance for ``torch.compile``.

Planning with the eager loop's cost is deliberately pessimistic for the graph engines (they remove the
per-iteration fixed cost) and TF32 is planned at the fp32 cost. Compile time cannot be derived from FLOPs:
``--compile-allowance MODE=SECONDS`` sets the allowance per mode (assumptions, printed with the plan).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Mapping

import torch

import benchlib
import providers as prov

# Seconds planned for torch.compile's compilation of one loop body, per mode (assumptions, not measurements:
# the rows record the real compile time in ``compile_s``). max-autotune benchmarks kernel candidates.
DEFAULT_COMPILE_ALLOWANCE_S = {"default": 90.0, "reduce-overhead": 120.0, "max-autotune": 300.0}


@dataclasses.dataclass(frozen=True)
class LoopCost:
    """Seconds per loop iteration at batch ``b``: ``fixed_s + b * per_image_s``."""

    fixed_s: float
    per_image_s: float

    def __post_init__(self):
        if not (self.fixed_s >= 0 and self.per_image_s > 0):
            raise ValueError(f"need fixed_s >= 0 and per_image_s > 0, got {self.fixed_s}, {self.per_image_s}")

    def iteration_s(self, batch: int) -> float:
        return self.fixed_s + batch * self.per_image_s

    @classmethod
    def fit(cls, small: tuple[int, float], large: tuple[int, float]) -> "LoopCost":
        """From ``(batch, seconds per iteration)`` measured at two batch sizes.

        The slope is floored at half the large batch's seconds per image: timing noise (or a batch still
        bound by launch overhead) must not make large batches look free.
        """
        (b1, s1), (b2, s2) = sorted((small, large))
        if b1 < 1 or b2 <= b1 or s1 <= 0 or s2 <= 0:
            raise ValueError(f"need two batch sizes 1 <= b1 < b2 with positive times, got {small}, {large}")
        per_image = max((s2 - s1) / (b2 - b1), 0.5 * s2 / b2)
        return cls(fixed_s=max(s1 - b1 * per_image, 0.0), per_image_s=per_image)


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Measured loop costs per precision and the FLOPs of one image-iteration."""

    flops_per_iter: float
    loops: Mapping[str, LoopCost]           # "fp32" (TF32 off) and "bf16"
    compile_allowance_s: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_COMPILE_ALLOWANCE_S))
    row_setup_s: float = 0.0                # a provider's prefix copy and first one-iteration call

    def loop(self, precision: str) -> LoopCost:
        """bf16 at the bf16 cost; fp32 and TF32 at the fp32 cost (TF32 is faster: the plan errs long)."""
        return self.loops["bf16" if precision == "bf16" else "fp32"]

    def flops_per_s(self, precision: str) -> float:
        return self.flops_per_iter / self.loop(precision).per_image_s

    def loop_s(self, precision: str, batch: int, iters: int, calls: int = 1) -> float:
        return calls * iters * self.loop(precision).iteration_s(batch)

    def capture_s(self, precision: str, batch: int, unrolled: int = 1) -> float:
        """A graph engine's first call warms up every bucket up to ``batch`` (two iterations each) and
        records ``unrolled`` iterations per bucket (host work: the fixed cost of each)."""
        from fsmooth.defense.graph import bucket_sizes
        loop = self.loop(precision)
        return sum(2 * loop.iteration_s(b) + unrolled * loop.fixed_s for b in bucket_sizes(max(batch, 1)))

    def compile_s(self, mode: str) -> float:
        return self.compile_allowance_s.get(mode, max(self.compile_allowance_s.values()))

    def provider_s(self, provider, batch: int, iters: int, calls: int, work_fraction: float = 1.0) -> float:
        """Seconds of ``calls`` calls of ``provider`` at ``batch`` x ``iters``, with its capture or compile;
        ``work_fraction``: the share of the iterations a call executes (early exit, see iters_per_sec.py)."""
        seconds = self.row_setup_s + work_fraction * self.loop_s(provider.precision, batch, iters, calls)
        if isinstance(provider, prov.EngineProvider) and provider.engine != "eager":
            unrolled = provider.options.get("chunk", 8) if provider.engine == "chunked" else 1
            seconds += self.capture_s(provider.precision, batch, unrolled)
        if isinstance(provider, prov.LoopProvider) and provider.compile_modes:
            seconds += self.compile_s(provider.compile_modes[0])
        if isinstance(provider, prov.EngineProvider) and provider.options.get("compile_prefix"):
            seconds += self.compile_s("default")
        return seconds

    def describe(self) -> str:
        parts = [f"{self.flops_per_iter / 1e9:.3g} GFLOP per image-iteration"]
        for name, loop in self.loops.items():
            parts.append(f"{name}: {self.flops_per_s(name):.3g} FLOP/s, {loop.fixed_s * 1e3:.3g} ms fixed per "
                         f"iteration")
        parts.append(f"{self.row_setup_s:.3g} s setup per row")
        allowances = ", ".join(f"{k} {v:g} s" for k, v in self.compile_allowance_s.items())
        return "; ".join(parts) + f" (measured); torch.compile allowance: {allowances} (assumed)"

    def as_rows(self) -> list[dict]:
        """One result row per measured precision (section ``plan``)."""
        return [{"section": "plan", "provider": f"probe-{name}", "status": "ok", "dtype": name,
                 "fixed_s": loop.fixed_s, "per_image_s": loop.per_image_s, "row_setup_s": self.row_setup_s,
                 "flops_per_s": self.flops_per_s(name), "flops_per_iter": self.flops_per_iter}
                for name, loop in self.loops.items()]


def probe_loop_costs(model, layer, device, flops_per_iter: float, probe_batch: int, sample_shape=(3, 32, 32),
                     iters: int = 3, beta: float = 80.0,
                     compile_allowance_s: Mapping[str, float] | None = None) -> CostModel:
    """Time the eager loop at batch 1 and ``probe_batch`` in fp32 (TF32 off) and bf16 (seconds)."""
    if probe_batch < 2:
        raise ValueError(f"probe_batch must be >= 2, got {probe_batch}")
    schedule = prov.Schedule(beta, 1e-30, iters)
    warm = prov.Schedule(beta, 1e-30, 1)
    gen = torch.Generator(device="cpu").manual_seed(12345)
    loops, setup_s = {}, 0.0
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        points = []
        for batch in (1, probe_batch):
            t0 = (0.25 + 0.5 * torch.rand((batch,) + tuple(sample_shape), generator=gen)).to(device)
            with benchlib.float32_matmul("ieee"):
                started = time.perf_counter()
                if batch == 1:
                    loss_fn = prov.make_loss_fn(prov.frozen_prefix(model, layer, dtype), dtype)
                prov.masked_loop(loss_fn, t0, warm)  # cuDNN algorithm choice, allocator warm-up
                benchlib.synchronize(device)
                if batch == 1:
                    setup_s = max(setup_s, time.perf_counter() - started)
                ms, _ = benchlib.time_once(lambda: prov.masked_loop(loss_fn, t0, schedule), device)
            points.append((batch, ms * 1e-3 / iters))
        loops[precision] = LoopCost.fit(*points)
        benchlib.release_memory(device)
    allowance = dict(DEFAULT_COMPILE_ALLOWANCE_S if compile_allowance_s is None else compile_allowance_s)
    return CostModel(float(flops_per_iter), loops, allowance, row_setup_s=setup_s)


class Budget:
    """Wall-clock seconds granted to a run (``None``: unlimited), counted from construction."""

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.monotonic):
        if seconds is not None and not seconds >= 0:
            raise ValueError(f"budget seconds must be >= 0 or None, got {seconds!r}")
        self.seconds = seconds
        self._clock = clock
        self._start = clock()

    def elapsed(self) -> float:
        return self._clock() - self._start

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def skip_reason(self, planned_s: float) -> str | None:
        """``None`` when ``planned_s`` fits in what is left, else the reason to skip it."""
        left = self.left()
        if planned_s <= left:
            return None
        return f"planned {planned_s:.3g} s > {max(left, 0):.3g} s left of the {self.seconds:g} s budget"


@dataclasses.dataclass
class Plan:
    """A cost model and a budget: what each row should take, and whether it still fits (``cost`` is
    ``None`` when nothing FLOP-bound runs, e.g. the loss-kernel section alone)."""

    cost: CostModel | None
    budget: Budget
    printer: Callable[[str], None] = print

    def announce(self, title: str, items: list[tuple[str, float]]) -> None:
        """Print a section's planned rows (before any of them runs) and their total."""
        total = sum(s for _, s in items)
        left = self.budget.left()
        fits = "fits" if total <= left else "does not fit: rows that would overrun are skipped"
        self.printer(f"# plan {title}: {len(items)} rows, {total:.3g} s planned, {left:.3g} s left ({fits})")
        for label, seconds in items:
            self.printer(f"#   {label}: {seconds:.3g} s")

    def skip_reason(self, planned_s: float) -> str | None:
        return self.budget.skip_reason(planned_s)


def workload_planned_s(cost: CostModel, provider, n: int, slots: int, schedule: prov.Schedule,
                       repeats: int, info: dict | None = None) -> float:
    """A workload row's planned seconds: one untimed call on ``slots`` inputs (with capture or compile), then
    ``repeats`` passes over the ``n`` inputs ``slots`` at a time (chunks, or the slots of one
    continuous-batching call), each executing :func:`exit_work_fraction` of ``max_iters``."""
    passes = -(-n // slots)
    fraction = prov.exit_work_fraction(provider, info, schedule)
    return (cost.provider_s(provider, slots, schedule.max_iters, 1, fraction)
            + fraction * cost.loop_s(provider.precision, slots, schedule.max_iters, calls=passes * repeats))
