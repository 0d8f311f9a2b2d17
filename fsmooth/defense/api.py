"""Public entry points: :class:`ActiveDefense` (a reusable engine) and :func:`defend`.

Noise: each call draws ``U(-sigma, sigma)`` once for the whole batch, from
``generator`` when given. The generator may live on ``x``'s device or on the
CPU; the draw happens on the generator's device (then moves to ``x``'s), so
a CPU generator gives the same noise whatever device the defense runs on.
Without a generator the global RNG of ``x``'s device is used.
"""
from __future__ import annotations

import contextlib
import math
import warnings
import weakref

import torch
from torch import nn

from .._validation import check_bool, check_finite, check_float_tensor, check_positive_int
from ..functional import check_backend
from . import graph
from .capture_flags import capture_flags
from .config import DIVERGENCE_PATIENCE, MAX_DISPLACEMENT, DefenseConfig
from .eager import run_eager
from .engines import check_engine, resolve_engine, unavailable_reason
from .prefix_state import PrefixState, indexed_device, model_device
from .result import DefenseResult, EngineRun

__all__ = ["ActiveDefense", "defend", "DefenseNotConvergedWarning", "DefenseDivergedWarning"]


class DefenseNotConvergedWarning(RuntimeWarning):
    """Some samples stopped at ``max_iters`` with ``L_F > delta``."""


class DefenseDivergedWarning(RuntimeWarning):
    """Some samples diverged: the step size is likely too large for the layer (see ``fsmooth calibrate``)."""


def _diverged(grew: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The divergence guard's verdict per sample: its loss kept rising, or its input left the sane range."""
    if t.shape[0] == 0:
        return grew
    distance = (t.float() - x.detach().float()).abs().flatten(1).amax(1)
    return grew | ~torch.isfinite(distance) | (distance > MAX_DISPLACEMENT)


def _expected_channels(module: nn.Module) -> int | None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


@contextlib.contextmanager
def _autograd_allowed():
    """Autograd on, even for ``torch.no_grad()`` / ``torch.inference_mode()`` callers."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


# engine="auto" degrades along this chain when an engine fails (ActiveDefense._run).
_FALLBACK_CHAIN = ("graph", "chunked", "eager")


def _inference_error(exc: BaseException) -> RuntimeError | None:
    if not isinstance(exc, RuntimeError) or "nference tensor" not in str(exc):
        return None
    return RuntimeError(
        "Active Defense differentiates the network prefix with respect to its input, which is impossible "
        "because the model's parameters or buffers are inference tensors (created or loaded under "
        "torch.inference_mode()). Create/load the model outside inference_mode; calling the defense from "
        f"inside inference_mode is fine. ({exc})")


class ActiveDefense:
    """Active Defense (Algorithm 1) on ``model``'s features at ``layer``; owns the prefix and captured graphs.

    Args:
        model: a classifier taking [0, 1] inputs. Its weights are never modified.
        layer: layer whose output feeds ``L_F`` (default: ``model.default_layer``, ``block1`` for WRNs).
        config: :class:`DefenseConfig`; default: ``DefenseConfig.for_model(model)``, the model's
            calibrated beta/delta (checkpoints calibrated by ``fsmooth calibrate`` carry them), else the paper's.
        engine: ``"auto"``, ``"eager"``, ``"graph"`` (single-launch WHILE node) or ``"chunked"``.
        dtype: prefix compute dtype; ``torch.bfloat16`` runs the prefix in bf16 channels_last while ``t``,
            ``L_F`` and the exit decision stay fp32. ``None``: the model's dtype.
        enforce_eager: never use CUDA graphs (also ``FSMOOTH_ENFORCE_EAGER=1``).
        max_batch: graph engines: largest captured bucket (more samples stream through its slots).
        chunk: ``"chunked"`` engine: iterations unrolled per graph replay.
        compact: graph engines: move the remaining active samples into smaller captured buckets as
            samples exit (``False``: ``"graph"`` runs a batch of at most ``max_batch`` in one launch).
        progress: graph engines: a tqdm bar over finished samples (off by default).
        backend: feature-loss backend (``"auto"``, ``"triton"``, ``"reference"``).
        compile_prefix: run the prefix ``torch.compile``-d (``True``: Inductor; or a backend name), inside
            the captured graphs too: Inductor's fused kernels with the graphs' launch-free loop. Experimental:
            the first call compiles (tens of seconds on a GPU); off by default.

    Call with ``(x, generator=None, return_info=False)``.
    """

    def __init__(self, model: nn.Module, layer: str | None = None, config: DefenseConfig | None = None, *,
                 engine: str = "auto", dtype: torch.dtype | None = None, enforce_eager: bool = False,
                 max_batch: int = 256, chunk: int = 8, compact: bool = True, progress: bool = False,
                 backend: str = "auto", compile_prefix: bool | str = False):
        if config is None:
            config = DefenseConfig.for_model(model)
        if not isinstance(config, DefenseConfig):
            raise TypeError(f"config must be a DefenseConfig, got {type(config).__name__}")
        self.engine = check_engine(engine)
        check_positive_int(max_batch, "max_batch")
        check_positive_int(chunk, "chunk")
        for name, value in (("enforce_eager", enforce_eager), ("compact", compact), ("progress", progress)):
            check_bool(value, name)
        self.backend = check_backend(backend)
        self.prefix = PrefixState(model, layer, dtype, compile_prefix=compile_prefix)
        # Weak: defend()'s cache is keyed weakly by the model, so a strong reference here would leak it.
        self._model_ref = weakref.ref(model)
        self.config = config
        self.enforce_eager = enforce_eager
        self.max_batch = max_batch
        self.chunk = chunk
        self.compact = compact
        self.progress = progress
        self._in_channels = _expected_channels(self.prefix.module)
        self._runners = {}
        self._failed_engines: set[str] = set()  # "auto" stops trying a graph engine that failed once

    @property
    def model(self) -> nn.Module | None:
        return self._model_ref()

    @property
    def layer(self) -> str:
        return self.prefix.layer

    @property
    def dtype(self) -> torch.dtype:
        return self.prefix.dtype

    def __repr__(self) -> str:
        c = self.config
        return (f"{type(self).__name__}(layer={self.layer!r}, sigma={c.sigma}, beta={c.beta}, delta={c.delta}, "
                f"max_iters={c.max_iters}, clamp={c.clamp}, engine={self.engine!r}, dtype={self.dtype})")

    # ---------------------------------------------------------------- checks and noise
    def _check_inputs(self, x) -> None:
        check_float_tensor(x, "x")
        if x.dim() != 4:
            raise ValueError(f"x must be a 4-D (B, C, H, W) batch, got shape {tuple(x.shape)}")
        if self._in_channels is not None and x.shape[1] != self._in_channels:
            raise ValueError(f"x must have {self._in_channels} channels for this model, got shape {tuple(x.shape)}")
        # Devices before values: reading a meta tensor's values (the finiteness check) fails obscurely.
        if x.device.type == "meta":
            raise ValueError("x is on the meta device: it has a shape but no values to defend")
        device = model_device(self.prefix.module)
        if device is not None and device != x.device:
            raise ValueError(f"model is on {device} but x is on {x.device}; move one of them")
        if x.numel():  # one synchronisation for both checks
            low, high = (float(v) for v in torch.aminmax(x.detach()))
            if not (math.isfinite(low) and math.isfinite(high)):
                check_finite(x, "x")  # NaN or Inf, named as everywhere else
            if low < 0 or high > 1:
                raise ValueError(f"x must be images with values in [0, 1] (sigma, beta and delta_test are set for that "
                                 f"range), got values in [{low:.4g}, {high:.4g}]")

    def draw_noise(self, x: torch.Tensor, generator: torch.Generator | None = None,
                   sigma: float | None = None) -> torch.Tensor:
        """The ``U(-sigma, sigma)`` offsets one call would add to ``x`` (state dtype, on ``x``'s device)."""
        sigma = self.config.sigma if sigma is None else sigma
        dtype = self.prefix.state_dtype
        if generator is None:
            u = torch.rand(x.shape, dtype=dtype, device=x.device)
        else:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
            gen_device = indexed_device(generator.device)
            if gen_device.type != "cpu" and gen_device != indexed_device(x.device):
                raise ValueError(f"generator must be on the CPU or on x's device ({x.device}), got {gen_device}")
            u = torch.rand(x.shape, dtype=dtype, device=gen_device, generator=generator).to(x.device)
        return (2.0 * u - 1.0) * sigma

    # ---------------------------------------------------------------- running
    def _runner(self, engine: str, x: torch.Tensor):
        # Keyed by the TF32/cuDNN flags too: captured graphs bake them in, so a call under other flags
        # gets its own runner instead of replaying kernels chosen under the old ones.
        key = (engine, x.device, tuple(x.shape[1:]), capture_flags())
        runner = self._runners.get(key)
        if runner is None:
            runner = graph.GraphRunner(self.prefix, x.device, tuple(x.shape[1:]), mode=engine,
                                       max_batch=self.max_batch, chunk=self.chunk, backend=self.backend,
                                       compact=self.compact, progress=self.progress)
            self._runners[key] = runner
        return runner

    def _run(self, engine: str, module: nn.Module, t0: torch.Tensor, config: DefenseConfig) -> tuple[EngineRun, str]:
        """The engine's :class:`EngineRun` and the name of the engine that ran.

        A forced engine runs or raises. ``engine="auto"`` tries ``engine`` and then the engines after it in
        graph -> chunked -> eager that can run here; one that fails is skipped from then on, with a
        warning that gives its error and the engine taken instead.
        """
        chain = [engine]
        if self.engine == "auto":
            later = _FALLBACK_CHAIN[_FALLBACK_CHAIN.index(engine) + 1:]
            chain = [e for e in (engine, *later) if e == "eager" or (
                e not in self._failed_engines
                and (e == engine or unavailable_reason(e, t0.device, self.enforce_eager) is None))]
        for i, candidate in enumerate(chain):
            if candidate == "eager":
                break
            try:
                return self._runner(candidate, t0).run(module, t0, config), candidate
            except Exception as exc:
                if self.engine != "auto" or _inference_error(exc) is not None:
                    raise
                # e.g. a model whose forward cannot be captured: "auto" degrades, it never fails.
                warnings.warn(f"the {candidate!r} defense engine failed ({type(exc).__name__}: {exc}); "
                              f"engine='auto' falls back to {chain[i + 1]!r} for this model", RuntimeWarning,
                              stacklevel=3)
                self._failed_engines.add(candidate)
                self._runners = {k: v for k, v in self._runners.items() if k[0] != candidate}
        return run_eager(lambda s: self.prefix.features(module, s), t0, config, backend=self.backend), "eager"

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None, return_info: bool = False, *,
                 noise: torch.Tensor | None = None, config: DefenseConfig | None = None):
        """Defend ``x``; ``noise`` (internal/tests) replaces the random draw with given offsets."""
        config = self.config if config is None else config
        if not isinstance(config, DefenseConfig):
            raise TypeError(f"config must be a DefenseConfig, got {type(config).__name__}")
        self._check_inputs(x)
        check_bool(return_info, "return_info")
        engine = resolve_engine(self.engine, x.device, self.enforce_eager)  # _run skips engines that failed
        if noise is not None:
            check_float_tensor(noise, "noise")
            if noise.shape != x.shape:
                raise ValueError(f"noise must have x's shape {tuple(x.shape)}, got {tuple(noise.shape)}")
        b = x.shape[0]
        with _autograd_allowed():
            if noise is None:
                noise = self.draw_noise(x, generator, config.sigma)
            t0 = x.detach().to(self.prefix.state_dtype) + noise.detach().to(x.device, self.prefix.state_dtype)
            if b == 0:
                run = EngineRun(t0, torch.zeros(0, dtype=torch.int64, device=x.device),
                                torch.zeros(0, dtype=torch.float32, device=x.device),
                                torch.zeros(0, dtype=torch.bool, device=x.device))
            else:
                try:
                    with self.prefix.session() as module:
                        run, engine = self._run(engine, module, t0, config)
                except RuntimeError as exc:
                    better = _inference_error(exc)
                    if better is not None:
                        raise better from exc
                    raise
            states = run.states.detach()
            result = DefenseResult(inputs=states.to(x.dtype), iterations=run.iterations,
                                   converged=run.loss <= config.delta, feature_loss=run.loss.float(), engine=engine,
                                   occupancy=run.occupancy, diverged=_diverged(run.grew, states, x))
        stuck = result.num_unconverged
        if stuck:
            warnings.warn(f"{stuck} of {b} samples reached max_iters={config.max_iters} with feature loss above "
                          f"delta={config.delta}", DefenseNotConvergedWarning, stacklevel=2)
        diverged = result.num_diverged
        if diverged:
            warnings.warn(
                f"{diverged} of {b} samples diverged (feature loss rising for {DIVERGENCE_PATIENCE} consecutive "
                f"steps, or the defended input more than {MAX_DISPLACEMENT} from the input in L-inf): the step "
                f"size beta={config.beta:g} is likely too large for layer {self.layer!r}, whose gradient scales "
                f"like 1/N. Run `fsmooth calibrate` (or fsmooth.calibrate.calibrate_defense) to choose beta and "
                f"delta_test for this model.", DefenseDivergedWarning, stacklevel=2)
        return result if return_info else result.inputs


# defend() reuses one engine per (model, layer, dtype, engine): graphs and buffers survive between calls.
# Each entry remembers the model's structure signature it was built for and is rebuilt when that changes.
_ENGINE_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _structure_signature(model: nn.Module) -> tuple:
    """What a built engine depends on beyond its arguments: the model's modules and weight tensors.

    An engine holds references to the prefix's modules, its dtype, and (CUDA graphs) the storage
    addresses of the weights, but reads weight values live. So an in-place update (an optimizer step,
    ``load_state_dict``) needs no rebuild, while a replaced module (``model.block1 = ...``) or tensor
    storage (``model.double()``, ``.to(device)``, ``param.data = ...``) does.
    """
    modules = tuple((name, id(m)) for name, m in model.named_modules(remove_duplicate=False))
    tensors = tuple((name, id(t), t.dtype, t.device, t.data_ptr())
                    for name, t in (*model.named_parameters(remove_duplicate=False),
                                    *model.named_buffers(remove_duplicate=False)))
    return modules, tensors


def _cached_engine(model: nn.Module, layer, engine: str, dtype) -> ActiveDefense:
    per_model = _ENGINE_CACHE.setdefault(model, {})
    key = (layer, engine, dtype)
    signature = _structure_signature(model)
    cached = per_model.get(key)
    if cached is None or cached[0] != signature:
        per_model[key] = cached = (signature, ActiveDefense(model, layer, engine=engine, dtype=dtype))
    return cached[1]


def defend(model: nn.Module, x: torch.Tensor, *, layer: str | None = None, sigma: float | None = None,
           beta: float | None = None, delta: float | None = None, max_iters: int = 1000, clamp=None,
           generator: torch.Generator | None = None, engine: str = "auto", dtype: torch.dtype | None = None,
           return_info: bool = False):
    """Active Defense of the batch ``x`` (values in [0, 1]) against ``model``.

    Per sample: ``t = x + U(-sigma, sigma)``; while ``L_F(t) > delta`` (and at most
    ``max_iters`` times): ``t -= beta * dL_F/dt``. ``sigma``, ``beta`` and
    ``delta`` left at ``None`` come from :meth:`DefenseConfig.for_model`: the
    model's calibration (``fsmooth calibrate``), else the paper's values
    (0.075, 80, 0.0124), which fit WRN-28-10's block1 only.

    Returns the defended inputs (shape, dtype and device of ``x``), or with
    ``return_info=True`` a :class:`DefenseResult` with per-sample iteration
    counts, convergence flags, final ``L_F`` and the engine used.
    Works for ``torch.no_grad()`` callers; the model's weights and modes are untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = DefenseConfig.for_model(model, sigma=sigma, beta=beta, delta=delta, max_iters=max_iters, clamp=clamp)
    defense = _cached_engine(model, layer, engine, dtype)
    return defense(x, generator, return_info, config=config)
