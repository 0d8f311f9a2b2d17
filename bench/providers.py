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
  channels_last, with or without compaction.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from typing import Callable

import torch
from torch import nn

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

    def __init__(self, name: str, engine: str, precision: str, options: dict | None = None):
        self.name = name
        self.engine = engine
        self.precision = precision
        self.options = dict(options or {})
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
            result = self._defense(t0, return_info=True, **kwargs)
        self._engine_used = result.engine
        if self.engine != "auto" and result.engine != self.engine:
            # A row must never be timed on another engine than its name says (engine="auto" may degrade).
            raise RuntimeError(f"{self.name}: asked for engine {self.engine!r}, but {result.engine!r} ran")
        return RunOutput(result.inputs, result.iterations, getattr(result, "occupancy", None))

    def describe(self) -> dict:
        return {"engine": self.engine, "engine_used": self._engine_used, "options": self.options_used}

    def close(self) -> None:
        self._defense = None


# ----------------------------------------------------------------------------------------------
# Registry

_DEFAULT_COMPILE_MODES = ("max-autotune", "reduce-overhead", "default")


def build_providers(names: list[str], compile_modes: tuple[str, ...] = _DEFAULT_COMPILE_MODES) -> list:
    """Providers by name (see :data:`PROVIDER_NAMES`)."""
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
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; choose from {sorted(table)}")
    return [table[n]() for n in names]


PROVIDER_NAMES = ("eager", "eager-bf16", "compile", "compile-bf16", "fsmooth-eager",
                  "graph-fp32", "graph-tf32", "graph-bf16", "chunked-fp32", "chunked-tf32", "chunked-bf16",
                  "graph-fp32-nocompact", "graph-tf32-nocompact", "graph-bf16-nocompact",
                  "chunked-fp32-nocompact", "chunked-tf32-nocompact", "chunked-bf16-nocompact")
