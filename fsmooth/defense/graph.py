"""CUDA-graph runner of the defense loop: slots, buckets, continuous batching, compaction.

Design (after the vLLM/SGLang CUDA-graph runners):

* **Slots.** The loop state lives in static buffers sized for the largest
  bucket: per slot the state ``t``, its update counter, an active flag, the
  last loss and the id of the sample it holds (``-1`` = empty). A bucket of
  size ``b`` is the view ``[:b]`` of every buffer, so all graphs share them.
* **One iteration**, captured without host syncs or RNG: prefix forward,
  fused ``L_F`` + gradient (Triton) masked by the active flags, backward to the
  input only, ``t -= beta * g`` on slots that stay active, counters, the
  active count and the loop predicate. Exited and empty slots are computed
  but never change.
* **Phases.** ``mode="graph"`` runs iterations inside one launch of a WHILE
  node until the active count drops to a threshold; ``mode="chunked"``
  replays ``chunk`` unrolled iterations per launch and checks the count on
  the host after each. Both then return to the host, which harvests exited
  slots into the outputs and either refills them from the queue of waiting
  samples (continuous batching: the threshold is 7/8 of the bucket while
  samples wait) or, once the queue is empty, compacts the live slots into the
  smallest bucket holding them (threshold: the next smaller bucket). With
  ``compact=False`` and at most ``max_batch`` samples, ``mode="graph"`` is
  a single launch for the whole call.
* **Capture.** Buckets are powers of two up to ``max_batch``; on the first
  call all of them are warmed up (cuDNN/Triton choices made eagerly) and
  captured largest first into one shared memory pool. Loop constants
  (``beta``, ``delta``, ``max_iters``, clamp bounds, the threshold) are device
  scalars, so one capture serves every configuration. What a capture bakes in
  (weight addresses, TF32/cuDNN flags: :func:`capture_flags`) is its
  signature; a call with another signature recaptures.
* **Trip cap.** A WHILE launch runs at most ``max_iters + 1`` iterations,
  counted on the device (:mod:`.while_loop`): no predicate bug can hang it.

A sample's trajectory is the eager engine's (same noise, same masked update);
only the batch composition inside a bucket changes, which may move results
by float rounding (convolution algorithms differ between batch sizes).
"""
from __future__ import annotations

import bisect
import contextlib
import logging

import torch
from tqdm.auto import tqdm

from ..functional import feature_loss_and_grad
from .capture_flags import capture_flags
from .config import DIVERGENCE_PATIENCE, DefenseConfig
from .result import EngineRun
from .while_loop import capture_while_loop, collector_paused

__all__ = ["GraphRunner", "bucket_sizes"]

_log = logging.getLogger(__name__)


def bucket_sizes(max_batch: int) -> list[int]:
    """Powers of two below ``max_batch``, then ``max_batch`` itself (ascending)."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


def _update_predicate(active, count, threshold, pred) -> None:
    """``pred`` = more than ``threshold`` slots active (device tensors only: captured, never synchronized)."""
    count.copy_(active.sum())
    torch.gt(count, threshold, out=pred)


class GraphRunner:
    """Runs the loop on one CUDA device for inputs of one per-sample shape; owns buffers and graphs."""

    # mode="graph": the WHILE node's trip cap (max_iters + 1, set at each launch), allocated at first capture.
    max_trips: torch.Tensor | None = None

    def __init__(self, prefix_state, device: torch.device, sample_shape: tuple, *, mode: str = "graph",
                 max_batch: int = 256, chunk: int = 8, backend: str = "auto", refill_fraction: float = 0.125,
                 compact: bool = True, progress: bool = False):
        if mode not in ("graph", "chunked"):
            raise ValueError(f"mode must be 'graph' or 'chunked', got {mode!r}")
        self._check_device(device)
        self.prefix = prefix_state
        self.device = device
        self.mode = mode
        self.chunk = chunk
        self.backend = backend
        self.refill_fraction = refill_fraction
        self.compact = compact
        self.progress = progress
        self.buckets = bucket_sizes(max_batch)
        self.max_batch = self.buckets[-1]
        state = prefix_state.state_dtype
        loss_dtype = torch.float64 if state == torch.float64 else torch.float32
        # Buffers are allocated once, outside any graph pool, and never reallocated.
        kw = dict(device=device)
        self.t = torch.zeros((self.max_batch,) + tuple(sample_shape), dtype=state, **kw)
        self.iters = torch.zeros(self.max_batch, dtype=torch.int64, **kw)
        self.active = torch.zeros(self.max_batch, dtype=torch.bool, **kw)
        self.loss = torch.zeros(self.max_batch, dtype=loss_dtype, **kw)
        self.slot_sample = torch.full((self.max_batch,), -1, dtype=torch.int64, **kw)
        # Divergence guard: consecutive loss increases per slot, and the sticky "grew" flag.
        self.streak = torch.zeros(self.max_batch, dtype=torch.int32, **kw)
        self.grew = torch.zeros(self.max_batch, dtype=torch.bool, **kw)
        self.beta = torch.zeros((), dtype=state, **kw)
        self.delta = torch.zeros((), dtype=loss_dtype, **kw)
        self.max_iters = torch.zeros((), dtype=torch.int64, **kw)
        self.clamp_lo = torch.full((), float("-inf"), dtype=state, **kw)
        self.clamp_hi = torch.full((), float("inf"), dtype=state, **kw)
        self.threshold = torch.zeros((), dtype=torch.int64, **kw)
        self.count = torch.zeros((), dtype=torch.int64, **kw)
        self.steps = torch.zeros((), dtype=torch.int64, **kw)
        self.pred = torch.zeros((), dtype=torch.bool, **kw)
        self.pool = None  # one memory pool shared by every captured bucket
        self._graphs: dict[int, object] = {}
        self._captured_for = None

    @staticmethod
    def _check_device(device: torch.device) -> None:
        if device.type != "cuda":
            raise RuntimeError(f"GraphRunner needs a CUDA device, got {device}")

    # ------------------------------------------------------------------ the captured iteration
    def _iteration(self, module, b: int) -> None:
        """One masked update of slots ``[:b]``; no host sync, no RNG, no allocation outside the pool."""
        t, active, iters, loss_buf = self.t[:b], self.active[:b], self.iters[:b], self.loss[:b]
        with torch.enable_grad():
            leaf = t.detach().requires_grad_(True)
            feats = self.prefix.features(module, leaf)
        # Exited/empty slots get a zero feature gradient, hence a zero input gradient.
        loss, grad_feats = feature_loss_and_grad(feats.detach(), grad_scale=active.to(torch.float32),
                                                 backend=self.backend)
        loss = loss.to(loss_buf.dtype)
        streak, grew = self.streak[:b], self.grew[:b]
        streak.copy_(torch.where(active & (loss > loss_buf), streak + 1, torch.where(active, 0, streak)))
        grew.logical_or_(streak >= DIVERGENCE_PATIENCE)
        loss_buf.copy_(torch.where(active, loss, loss_buf))
        keep = active & (loss > self.delta) & (iters < self.max_iters)
        (grad_t,) = torch.autograd.grad(feats, leaf, grad_outputs=grad_feats)
        step = torch.clamp(t - self.beta * grad_t, min=self.clamp_lo, max=self.clamp_hi)
        t.copy_(torch.where(keep.view((-1,) + (1,) * (t.dim() - 1)), step, t))
        iters.add_(keep.to(torch.int64))
        active.copy_(keep)
        self.count.copy_(keep.sum())
        self.steps.add_(1)
        torch.gt(self.count, self.threshold, out=self.pred)

    def _update_predicate(self, b: int) -> None:
        _update_predicate(self.active[:b], self.count, self.threshold, self.pred)

    # ------------------------------------------------------------------ capture
    def _signature(self, module):
        """What the captured graphs bake in: the prefix's weight addresses and the TF32/cuDNN flags."""
        return (id(module), tuple(p.data_ptr() for p in module.parameters()),
                tuple(p.data_ptr() for p in module.buffers()), capture_flags())

    def _warm_up(self, module, b: int) -> None:
        # With every slot inactive an iteration changes nothing but the step counter.
        self.active[:b] = False
        for _ in range(2):
            self._iteration(module, b)

    def _capture(self, module, b: int):
        if self.mode == "chunked":
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                for _ in range(self.chunk):
                    self._iteration(module, b)
            return graph

        # The loop object keeps its start phase: build it from the buffers, not from ``self``, so that a
        # dead runner is no reference cycle and its graphs and pool go as soon as it does.
        active, count, threshold, pred = self.active[:b], self.count, self.threshold, self.pred
        max_iters, max_trips = self.max_iters, self.max_trips

        def start_phase():
            _update_predicate(active, count, threshold, pred)
            # Every slot exits within max_iters + 1 iterations of a launch (the last one only sees its
            # exit), so this cap never cuts a correct loop short; it stops a predicate bug on the device.
            torch.add(max_iters, 1, out=max_trips)

        return capture_while_loop(lambda: self._iteration(module, b), start_phase, pred, self.pool, max_trips)

    def _ensure_captured(self, module, b: int) -> None:
        """Capture every bucket, largest first, once per signature (``b``, the call's bucket, is among them).

        All at once rather than the buckets each call reaches: a later, larger call would otherwise
        capture into a pool the smaller graphs already use, and pay a capture in the middle of a run.
        """
        signature = self._signature(module)
        if signature != self._captured_for:
            if self._graphs:
                _log.info("prefix weights or TF32/cuDNN flags changed: recapturing the defense graphs")
            self._graphs.clear()
            self._captured_for = signature
        if not self._graphs:
            self._capture_buckets(module, sorted(self.buckets, reverse=True))
            self.active.zero_()
            self.steps.zero_()

    def _capture_buckets(self, module, sizes: list[int]) -> None:
        """Warm up and capture ``sizes`` in the given order (largest first: smaller captures reuse its
        blocks of the shared pool)."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        if self.mode == "graph" and self.max_trips is None:
            self.max_trips = torch.zeros((), dtype=torch.int64, device=self.device)  # outside the pool
        # Warm up on a side stream (cuDNN algorithm choice, Triton compilation) before any capture.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for size in sizes:
                self._warm_up(module, size)
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        with collector_paused(), self._no_recompile():
            for size in sizes:
                self._graphs[size] = self._capture(module, size)
        _log.debug("captured %s defense graphs for buckets %s", self.mode, sizes)

    def _no_recompile(self):
        """With a compiled prefix, a recompilation inside a capture (the warm-up above should have made every
        one) fails with Dynamo's reason instead of invalidating the capture obscurely."""
        if self.prefix.compile_prefix is False:
            return contextlib.nullcontext()
        from torch._dynamo import config as dynamo_config
        return dynamo_config.patch(error_on_recompile=True)

    # ------------------------------------------------------------------ host side
    def _bucket_for(self, n: int) -> int:
        return self.buckets[min(bisect.bisect_left(self.buckets, n), len(self.buckets) - 1)]

    def _lower_bucket(self, b: int) -> int:
        i = self.buckets.index(b)
        return self.buckets[i - 1] if i > 0 else 0

    def _set_config(self, config: DefenseConfig) -> None:
        self.beta.fill_(config.beta)
        self.delta.fill_(config.delta)
        self.max_iters.fill_(config.max_iters)
        lo, hi = config.clamp if config.clamp is not None else (float("-inf"), float("inf"))
        self.clamp_lo.fill_(lo)
        self.clamp_hi.fill_(hi)

    def _launch(self, b: int) -> None:
        graph = self._graphs[b]
        if self.mode == "chunked":
            graph.replay()
        else:
            graph.launch()

    def _harvest(self, b: int, out_t, out_iters, out_loss, out_grew) -> int:
        slots = self.slot_sample[:b]
        pos = ((~self.active[:b]) & (slots >= 0)).nonzero().squeeze(1)
        if pos.numel():
            ids = slots[pos]
            out_t[ids] = self.t[pos]
            out_iters[ids] = self.iters[pos]
            out_loss[ids] = self.loss[pos]
            out_grew[ids] = self.grew[pos]
            slots[pos] = -1
        return pos.numel()

    def _refill(self, b: int, t0: torch.Tensor, next_sample: int) -> int:
        free = (self.slot_sample[:b] < 0).nonzero().squeeze(1)
        k = min(free.numel(), t0.shape[0] - next_sample)
        if k > 0:
            pos = free[:k]
            ids = torch.arange(next_sample, next_sample + k, device=self.device)
            self.t[pos] = t0[ids]
            self.iters[pos] = 0
            self.active[pos] = True
            self.loss[pos] = float("inf")  # the first loss is no "increase" for the divergence guard
            self.streak[pos] = 0
            self.grew[pos] = False
            self.slot_sample[pos] = ids
        return next_sample + k

    def _compact(self, b: int) -> int:
        """Gather the live slots of ``[:b]`` to the front; returns the new bucket size."""
        live = (self.slot_sample[:b] >= 0).nonzero().squeeze(1)
        m = live.numel()
        new_b = self._bucket_for(max(m, 1))
        if new_b >= b:
            return b
        for buf in (self.t, self.iters, self.active, self.loss, self.slot_sample, self.streak, self.grew):
            buf[:m] = buf[live]  # index_select copies first, so overlapping ranges are safe
        self.slot_sample[m:b] = -1
        self.active[m:b] = False
        return new_b

    def _device_guard(self):
        """``self.device`` as the current CUDA device: captures, replays, side streams and Triton launches use
        the current device, which need not be the input's (a defense on cuda:1 called while cuda:0 is current)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def run(self, module, t0: torch.Tensor, config: DefenseConfig) -> EngineRun:
        """Defend every sample of ``t0`` (noisy starts, in the state dtype: the caller casts once)."""
        with self._device_guard():
            return self._run(module, t0, config)

    def _run(self, module, t0: torch.Tensor, config: DefenseConfig) -> EngineRun:
        if t0.dtype != self.t.dtype:
            raise TypeError(f"t0 must be in the state dtype {self.t.dtype}, got {t0.dtype}")
        n = t0.shape[0]
        t0 = t0.contiguous()
        out_t = t0.clone()
        out_iters = torch.zeros(n, dtype=torch.int64, device=self.device)
        out_loss = torch.zeros(n, dtype=self.loss.dtype, device=self.device)
        out_grew = torch.zeros(n, dtype=torch.bool, device=self.device)
        b = self._bucket_for(n)
        self._ensure_captured(module, b)
        self._set_config(config)
        self.slot_sample.fill_(-1)
        self.active.zero_()
        self.steps.zero_()
        next_sample = self._refill(b, t0, 0)
        slot_evals, steps_seen = 0, 0
        bar = tqdm(total=n, desc=f"active defense ({self.mode})", unit="img", disable=not self.progress)
        while True:
            waiting = next_sample < n
            if waiting:
                threshold = b - max(1, int(b * self.refill_fraction))
            else:
                threshold = self._lower_bucket(b) if self.compact else 0
            self.threshold.fill_(threshold)
            self._launch(b)
            while True:  # chunked: keep replaying while the phase is not over (one host check per chunk)
                count = int(self.count.item())
                if self.mode == "graph" or count <= threshold:
                    break
                self._launch(b)
            steps = int(self.steps.item())
            slot_evals += (steps - steps_seen) * b
            steps_seen = steps
            bar.update(self._harvest(b, out_t, out_iters, out_loss, out_grew))
            if waiting:
                next_sample = self._refill(b, t0, next_sample)
            if next_sample >= n:
                if count == 0 and not bool((self.slot_sample[:b] >= 0).any()):
                    break
                if self.compact:
                    b = self._compact(b)
        bar.close()
        useful = float(out_iters.sum()) + n
        occupancy = useful / slot_evals if slot_evals else 1.0
        return EngineRun(out_t, out_iters, out_loss, out_grew, occupancy)
