"""Implementations of the Active Defense loop that the benchmark puts side by side.

Every provider runs the same per-sample loop from the same starting point
``t0`` (the noise is drawn once by the benchmark and added to the inputs, and
every provider runs with ``sigma=0``), with the same ``beta``, ``delta`` and
``max_iters``:

* ``eager`` / ``eager-bf16``: the paper-faithful loop in plain PyTorch (Python
  loop, autograd, masked batch: exited samples keep costing compute), with
  the pure-PyTorch reference loss. ``eager`` is fp32 with TF32 off: the
  baseline every speedup is relative to.
* ``compile`` / ``compile-bf16``: the same loop whose body (prefix + loss,
  forward and autograd backward) is ``torch.compile``-d; the first mode of
  ``compile_modes`` that compiles and runs is used, the errors of the others
  are recorded.
* ``fsmooth-*``: :class:`fsmooth.ActiveDefense` engines (eager, chunked CUDA
  graphs, single-launch while-node graph), in fp32 (TF32 off), TF32, or bf16
  channels_last, with or without compaction; ``*-compiled``: with the prefix
  ``torch.compile``-d inside the graphs (``compile_prefix=True``).
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import statistics
import time
from typing import Callable

import torch
from torch import nn

import fsmooth.models as models

import benchlib

_log = logging.getLogger("bench.providers")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The loop's hyperparameters, shared by every provider (noise is pre-added: sigma is 0)."""

    beta: float
    delta: float
    max_iters: int


@dataclasses.dataclass
class RunOutput:
    inputs: torch.Tensor          # defended inputs
    iterations: torch.Tensor      # int64 (B,) updates per sample
    occupancy: float | None = None  # useful slot-iterations / executed slot-iterations, if known


# ----------------------------------------------------------------------------------------------
# The plain-PyTorch loop (eager and torch.compile share it)


def frozen_prefix(model: nn.Module, layer: str | None, dtype: torch.dtype) -> nn.Module:
    """An eval-mode prefix with frozen weights in ``dtype`` (bf16 goes channels_last)."""
    import copy

    import fsmooth.models as models
    module = copy.deepcopy(models.prefix(model, layer)).eval()
    module = module.to(dtype=dtype)
    if dtype in (torch.float16, torch.bfloat16):
        module = module.to(memory_format=torch.channels_last)
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def make_loss_fn(module: nn.Module, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """``t`` (fp32) -> per-sample fp32 ``L_F`` of ``module(t)`` computed in ``dtype``."""
    from fsmooth.reference import feature_loss_reference
    channels_last = dtype in (torch.float16, torch.bfloat16)

    def loss_fn(t: torch.Tensor) -> torch.Tensor:
        x = t.to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return feature_loss_reference(module(x)).float()

    return loss_fn


def masked_loop(loss_fn, t0: torch.Tensor, schedule: Schedule, record_losses: bool = False):
    """Algorithm 1 on a whole batch with a mask: exited samples are computed but not updated.

    Per sample: ``l = L_F(t)``; while ``l > delta`` and fewer than
    ``max_iters`` updates: ``t -= beta * dL_F/dt``. Returns
    ``(t, iterations, losses)`` where ``losses`` is the ``(B, steps)``
    trajectory when ``record_losses`` (else ``None``).
    """
    t = t0.clone()
    b = t.shape[0]
    iterations = torch.zeros(b, dtype=torch.int64, device=t.device)
    active = torch.ones(b, dtype=torch.bool, device=t.device)
    history = []
    shape = (-1,) + (1,) * (t.dim() - 1)
    with torch.enable_grad():
        while True:
            leaf = t.detach().requires_grad_(True)
            loss = loss_fn(leaf)
            if record_losses:
                history.append(loss.detach())
            active = active & (loss.detach() > schedule.delta) & (iterations < schedule.max_iters)
            if not bool(active.any()):  # a host sync per iteration, as in a plain Python loop
                break
            (grad,) = torch.autograd.grad(loss.sum(), leaf)
            t = t - schedule.beta * grad * active.view(shape).to(grad.dtype)
            iterations += active
    losses = torch.stack(history, dim=1) if record_losses else None
    return t.detach(), iterations, losses


class LoopProvider:
    """``eager``/``compile`` providers: :func:`masked_loop` over a (possibly compiled) loss function."""

    def __init__(self, name: str, precision: str, compile_modes: tuple[str, ...] = ()):
        self.name = name
        self.precision = precision            # "fp32" (TF32 off), "tf32" or "bf16"
        self.compile_modes = compile_modes    # empty: eager
        self.mode_used: str | None = None
        self.compile_s: float | None = None     # seconds of the compile (and its two probe steps) that worked
        self.compile_errors: dict[str, str] = {}
        self._loss_fn = None

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def unavailable(self, device: torch.device) -> str | None:
        if self.compile_modes and not hasattr(torch, "compile"):
            return "this torch has no torch.compile"
        return None

    def matmul_mode(self) -> str:
        return "tf32" if self.precision == "tf32" else "ieee"

    def prepare(self, model: nn.Module, layer: str | None, schedule: Schedule, example: torch.Tensor) -> None:
        module = frozen_prefix(model, layer, self.dtype)
        eager_fn = make_loss_fn(module, self.dtype)
        if not self.compile_modes:
            self._loss_fn = eager_fn
            return
        self._loss_fn = self._compile(eager_fn, schedule, example)

    def _compile(self, eager_fn, schedule: Schedule, example: torch.Tensor):
        """The first mode that compiles and runs two loop steps; errors of the others are kept."""
        probe = Schedule(schedule.beta, 1e-30, 2)
        for mode in self.compile_modes:
            torch._dynamo.reset()
            started = time.perf_counter()
            try:
                fn = torch.compile(eager_fn, mode=None if mode == "default" else mode, dynamic=False)
                with benchlib.float32_matmul(self.matmul_mode()):
                    masked_loop(fn, example, probe)
                    masked_loop(fn, example, probe)  # cudagraph trees record on the second call
            except Exception as exc:  # inductor/cudagraph failures differ by version: record, try the next
                self.compile_errors[mode] = benchlib.error_reason(exc)
                _log.warning("torch.compile mode %s failed: %s", mode, self.compile_errors[mode])
                continue
            self.mode_used = mode
            self.compile_s = round(time.perf_counter() - started, 3)
            return fn
        raise RuntimeError(f"no torch.compile mode worked: {self.compile_errors}")

    def run(self, t0: torch.Tensor, schedule: Schedule) -> RunOutput:
        with benchlib.float32_matmul(self.matmul_mode()):
            t, iterations, _ = masked_loop(self._loss_fn, t0, schedule)
        executed = int(iterations.max()) * t0.shape[0] if t0.shape[0] else 0
        occupancy = float(iterations.sum()) / executed if executed else None
        return RunOutput(t, iterations, occupancy)

    def describe(self) -> dict:
        if not self.compile_modes:
            return {"engine_used": "pytorch-loop"}
        out = {"engine_used": f"torch.compile:{self.mode_used}", "compile_mode": self.mode_used,
               "compile_s": self.compile_s}
        if self.compile_errors:
            out["compile_errors"] = self.compile_errors
        return out

    def close(self) -> None:
        self._loss_fn = None
        if self.compile_modes:
            torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# fsmooth engines


class EngineProvider:
    """An :class:`fsmooth.ActiveDefense` engine with the given precision and options."""

    def __init__(self, name: str, engine: str, precision: str, options: dict | None = None,
                 prefix_attrs: dict | None = None):
        self.name = name
        self.engine = engine
        self.precision = precision
        self.options = dict(options or {})
        self.prefix_attrs = dict(prefix_attrs or {})  # set on the defense's PrefixState before its first call
        self.options_used = dict(self.options)
        self._defense = None
        self._engine_used = None

    @property
    def dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.precision == "bf16" else None

    def matmul_mode(self) -> str:
        return "tf32" if self.precision == "tf32" else "ieee"

    def unavailable(self, device: torch.device) -> str | None:
        try:
            from fsmooth.defense import ActiveDefense
        except Exception as exc:  # the engine package may be missing or broken in this tree
            return f"fsmooth.defense is not importable ({benchlib.error_reason(exc)})"
        params = inspect.signature(ActiveDefense).parameters
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        missing = [k for k in self.options if k not in params and not takes_kwargs]
        if missing:
            return f"ActiveDefense has no option(s) {missing}"
        try:
            from fsmooth.defense.engines import unavailable_reason
        except ImportError:
            return None
        return unavailable_reason(self.engine, device)

    def prepare(self, model: nn.Module, layer: str | None, schedule: Schedule, example: torch.Tensor) -> None:
        from fsmooth.defense import ActiveDefense
        options = dict(self.options)
        params = inspect.signature(ActiveDefense).parameters
        if self.engine != "eager" and "max_batch" in params:
            # One captured bucket as large as the batch: a timed batch never streams through smaller slots.
            options.setdefault("max_batch", max(int(example.shape[0]), 1))
        self.options_used = options
        with benchlib.float32_matmul(self.matmul_mode()):
            self._defense = ActiveDefense(model, layer, self._config(schedule), engine=self.engine,
                                          dtype=self.dtype, **options)
        for attr, value in self.prefix_attrs.items():
            if not hasattr(self._defense.prefix, attr):
                raise RuntimeError(f"{self.name}: this fsmooth's PrefixState has no {attr!r}")
            setattr(self._defense.prefix, attr, value)

    @staticmethod
    def _config(schedule: Schedule):
        from fsmooth.defense import DefenseConfig
        return DefenseConfig(sigma=0.0, beta=schedule.beta, delta=schedule.delta, max_iters=schedule.max_iters)

    def run(self, t0: torch.Tensor, schedule: Schedule) -> RunOutput:
        import warnings
        config = self._config(schedule)
        kwargs = {}
        if config != self._defense.config:
            if "config" not in inspect.signature(self._defense.__call__).parameters:
                raise ValueError("this ActiveDefense takes no per-call config: prepare() with the schedule")
            kwargs["config"] = config
        with benchlib.float32_matmul(self.matmul_mode()), warnings.catch_warnings():
            # Fixed-iteration schedules end every sample at max_iters on purpose.
            warnings.filterwarnings("ignore", message=".*reached max_iters.*")
            x, noise = start_parts(t0, getattr(self._defense.prefix, "state_dtype", t0.dtype))
            result = self._defense(x, return_info=True, noise=noise, **kwargs)
        self._engine_used = result.engine
        if self.engine != "auto" and result.engine != self.engine:
            # A row must never be timed on another engine than its name says (engine="auto" may degrade).
            raise RuntimeError(f"{self.name}: asked for engine {self.engine!r}, but {result.engine!r} ran")
        return RunOutput(result.inputs, result.iterations, getattr(result, "occupancy", None))

    def describe(self) -> dict:
        return {"engine": self.engine, "engine_used": self._engine_used, "options": self.options_used,
                **({"prefix_attrs": self.prefix_attrs} if self.prefix_attrs else {})}

    def close(self) -> None:
        self._defense = None


# ----------------------------------------------------------------------------------------------
# Registry

_DEFAULT_COMPILE_MODES = ("max-autotune", "reduce-overhead", "default")


def _provider_table(compile_modes: tuple[str, ...]) -> dict:
    """Name -> provider factory: the one list of the providers."""
    table = {
        "eager": lambda: LoopProvider("eager", "fp32"),
        "eager-bf16": lambda: LoopProvider("eager-bf16", "bf16"),
        "compile": lambda: LoopProvider("compile", "fp32", compile_modes),
        "compile-bf16": lambda: LoopProvider("compile-bf16", "bf16", compile_modes),
        "fsmooth-eager": lambda: EngineProvider("fsmooth-eager", "eager", "fp32"),
    }
    for engine in ("graph", "chunked"):
        for precision in ("fp32", "tf32", "bf16"):
            # The engines compact by default; "-nocompact" is masking only (ActiveDefense(compact=False)).
            name = f"{engine}-{precision}"
            table[name] = (lambda e=engine, p=precision, n=name: EngineProvider(n, e, p))
            nc = f"{name}-nocompact"
            table[nc] = (lambda e=engine, p=precision, n=nc: EngineProvider(n, e, p, {"compact": False}))
            # The prefix torch.compile-d (Inductor, symbolic batch) inside the captured graphs.
            cp = f"{name}-compiled"
            table[cp] = (lambda e=engine, p=precision, n=cp: EngineProvider(n, e, p, {"compile_prefix": True}))
        # bf16 with the copy's BatchNorms kept as BatchNorms, not run as affine maps (the code before
        # 2026-11-26): the A/B baseline, uncompiled and compiled.
        for suffix, options in (("bf16-bn", {}), ("bf16-compiled-bn", {"compile_prefix": True})):
            bn = f"{engine}-{suffix}"
            table[bn] = (lambda e=engine, n=bn, o=options: EngineProvider(n, e, "bf16", o,
                                                                        {"affine_batchnorms": False}))
        # bf16 with the affine BatchNorms run by addcmul, not the Triton kernel (the code before 2026-11-27):
        # the kernel's A/B baseline (the compiled prefix never runs the kernel: Inductor fuses the map).
        ac = f"{engine}-bf16-addcmul"
        table[ac] = (lambda e=engine, n=ac: EngineProvider(n, e, "bf16", None, {"affine_kernel": False}))
    return table


def build_providers(names: list[str], compile_modes: tuple[str, ...] = _DEFAULT_COMPILE_MODES) -> list:
    """Providers by name (see :data:`PROVIDER_NAMES`)."""
    table = _provider_table(compile_modes)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; choose from {sorted(table)}")
    return [table[n]() for n in names]


PROVIDER_NAMES = tuple(_provider_table(()))


# Error of the checked state against fp32 eager, relative to the eager update (see check_schedule).
# dL_F/dF is sign(F - mean) based: reduced precision flips the signs of elements near the mean, so a
# correct bf16 step lands 5-10 % off (seen on CPU); a wrong sign or scale lands at >= 1.
CHECK_TOLERANCE = {"fp32": 1e-2, "tf32": 0.2, "bf16": 0.25}


FIXED_DELTA = 1e-30  # "nobody exits": L_F of non-constant features never gets this small


# ----------------------------------------------------------------------------------------------
# Inputs and models


def make_model(arch: str, device: torch.device) -> torch.nn.Module:
    """An untrained WRN (random init, fixed seed) in eval mode; only the prefix's cost matters here."""
    torch.manual_seed(0)
    return models.build(arch).to(device).eval()


def start_parts(t0: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x in [0, 1], noise)`` whose sum in ``dtype`` (how the defense adds them) is ``t0`` rounded to ``dtype``.

    The defense takes images in [0, 1] and adds their noise itself. ``t0`` is rounded to ``dtype`` first:
    then ``noise = t0 - x`` is exact (Sterbenz, for ``t0`` in [1, 2]) and fits ``dtype``, where the sum of
    separately rounded parts could differ from ``t0``'s rounding by one unit in the last place.
    """
    rounded = t0.to(dtype).to(t0.dtype)
    x = rounded.clamp(0, 1)
    return x, rounded - x


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
# Measuring providers (shared by every section of iters_per_sec.py)


def reference_run(model, layer, schedule: Schedule, t0: torch.Tensor) -> RunOutput:
    """The fp32 eager loop (TF32 off): ground truth for every provider's check."""
    ref = LoopProvider("eager", "fp32")
    ref.prepare(model, layer, schedule, t0)
    return ref.run(t0, schedule)


def compare(out: RunOutput, ref: RunOutput, t0: torch.Tensor) -> dict:
    """Final-state error relative to the eager update, and how many iteration counts differ."""
    update = (ref.inputs.double() - t0.double()).norm()
    diff = (out.inputs.double() - ref.inputs.double()).norm()
    return {"rel_err": float(diff / update.clamp_min(1e-30)),
            "iters_mismatch": int((out.iterations.cpu() != ref.iterations.cpu()).sum()),
            "finite": bool(torch.isfinite(out.inputs).all())}


def check_schedule(schedule: Schedule, check_iters: int) -> Schedule:
    """The first ``check_iters`` updates of ``schedule``.

    With beta=80 on an untrained network the loop is chaotic: rounding
    differences (TF32, bf16, another reduction order) grow over hundreds of
    iterations until final states share nothing, without either being wrong.
    A few updates test every part of the step (forward, loss, gradient,
    masked update, exit test) before that amplification.
    """
    return Schedule(schedule.beta, schedule.delta, min(schedule.max_iters, check_iters))


def measure(provider, model, layer, schedule: Schedule, sets: list[torch.Tensor], ref: RunOutput,
            repeats: int, warmup: int, device, check: Schedule | None = None) -> dict:
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


def exit_work_fraction(provider, info: dict | None, schedule: Schedule) -> float:
    """Planned share of ``max_iters`` that an early-exit call executes.

    A masked batch (the eager loop, an engine with ``compact=False``) runs until its slowest sample exits:
    all of it. An engine that drops or compacts exited samples executes about the samples' mean exit
    iteration, measured by the exit schedule's pilot run (``pilot_iters_mean``), plus 25 % for bucket
    rounding; without a pilot, all of it.
    """
    mean = (info or {}).get("pilot_iters_mean")
    drops_exited = isinstance(provider, EngineProvider) and provider.options.get("compact", True)
    if mean is None or not drops_exited or schedule.max_iters <= 0:
        return 1.0
    return min(1.0, 1.25 * mean / schedule.max_iters)


def sweep(section: str, names, model, layer, schedule, batches, args, device, record, extra=None,
          source=make_start_points, plan=None) -> list[dict]:
    """Every provider at every batch size with one schedule, in the order given (batch-major).

    Each row goes to ``record`` when measured (a row gets its ratio to ``eager`` when the eager row of its
    batch came earlier). With a ``plan``: every row's planned seconds are printed before the first runs,
    and a row that would overrun the budget is recorded as skipped (later, cheaper rows still run).
    """
    check = check_schedule(schedule, args.check_iters)
    jobs = [(batch, provider) for batch in batches
            for provider in build_providers(list(names), tuple(args.compile_modes))]
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
