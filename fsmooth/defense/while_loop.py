"""A device-side WHILE loop around a captured iteration: the whole loop is one graph launch.

Two implementations, picked by feature detection:

* **native** (torch >= 2.14): ``CUDAGraph.begin_capture_to_while_node(pred)``
  opens a conditional WHILE node during capture; the body is captured into
  it and re-arms the condition from ``pred`` at its end.
* **extension** (older torch, e.g. 2.11): the iteration is captured as an
  ordinary graph kept alive with ``CUDAGraph(keep_graph=True)``; the
  ``fsmooth._C`` op ``WhileLoopGraph`` builds a parent graph
  ``[set condition from pred] -> WHILE{ child graph(iteration) -> [set condition from pred] }``,
  instantiates it and launches it on the current stream.

Either way ``pred`` is a 0-dim bool CUDA tensor the iteration writes
(``active count > threshold``); the caller computes its initial value.

**Trip cap.** ``max_trips`` (a 0-dim int64 device tensor, read at every trip)
bounds the iterations of one launch on the device itself, so a predicate that
never turns false (a bug, a NaN) ends the launch instead of hanging the GPU.
The extension counts trips in its condition kernels, outside the captured
body; the native path counts them in captured ops after the body.
"""
from __future__ import annotations

import contextlib
import functools
import gc

import torch

from .._ext import abi_reason

__all__ = ["native_while_available", "extension_while_reason", "while_loop_unavailable_reason",
           "capture_while_loop", "collector_paused"]


@contextlib.contextmanager
def collector_paused():
    """Collect garbage now, then keep Python's cyclic collector off until the block ends.

    A dead reference cycle that owns a CUDA graph is destroyed whenever the collector next runs; if that is
    in the middle of a capture, destroying the graph is an illegal call under the capture's global mode and
    invalidates it ("operation failed due to a previous error during capture", seen on the first GPU run).
    torch >= 2.6 no longer collects before a capture (``torch.compiler.config.force_cudagraph_gc``), so
    every capture of fsmooth runs inside this block. Nesting is safe.
    """
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def native_while_available() -> bool:
    graph_type = getattr(torch.cuda, "CUDAGraph", None)
    return graph_type is not None and all(
        hasattr(graph_type, name) for name in
        ("begin_capture_to_while_node", "set_conditional_handle_for_current_node", "end_capture_to_conditional_node"))


@functools.lru_cache(maxsize=None)
def extension_while_reason() -> str | None:
    """``None`` when the ``fsmooth._C`` while-loop builder can run here, else why not."""
    reason = abi_reason()
    if reason is not None:
        return reason
    if not torch.cuda.is_available():
        return "CUDA is not available"
    supported, why = _extension_support()
    if not supported:
        return why
    try:
        torch.cuda.CUDAGraph(keep_graph=True)
    except TypeError:
        return f"torch {torch.__version__} has no CUDAGraph(keep_graph=True), needed to export the captured body"
    if not hasattr(torch.cuda.CUDAGraph, "raw_cuda_graph"):
        return f"torch {torch.__version__} has no CUDAGraph.raw_cuda_graph()"
    return None


def _extension_support() -> tuple[bool, str]:
    code = int(torch.ops.fsmooth.while_loop_supported())
    if code == 0:
        return True, ""
    return False, {1: "the CUDA runtime fsmooth._C was built with has no conditional graph nodes (needs >= 12.4)",
                   2: "the CUDA driver is too old for conditional graph nodes (needs >= 12.4)"}.get(
                       code, f"conditional graph nodes unsupported (code {code})")


def while_loop_unavailable_reason(device: torch.device) -> str | None:
    """``None`` if a single-launch WHILE loop can be captured on ``device``, else the reason."""
    if native_while_available():
        return None
    reason = extension_while_reason()
    if reason is None:
        return None
    return (f"torch {torch.__version__} has no CUDAGraph.begin_capture_to_while_node and the extension "
            f"fallback is unavailable: {reason}")


class _NativeWhileGraph:
    """torch's own conditional-node capture; the trip cap is captured after the body."""

    def __init__(self, body_fn, initial_pred_fn, pred: torch.Tensor, max_trips: torch.Tensor, pool):
        self.trips = torch.zeros((), dtype=torch.int64, device=pred.device)  # outside the pool: never reused
        self.graph = torch.cuda.CUDAGraph()
        with collector_paused(), torch.cuda.graph(self.graph, pool=pool):
            initial_pred_fn()
            self.trips.zero_()
            pred.logical_and_(max_trips > 0)
            self.graph.begin_capture_to_while_node(pred)
            try:
                body_fn()
                self.trips.add_(1)
                pred.logical_and_(self.trips < max_trips)
                self.graph.set_conditional_handle_for_current_node(pred)
            finally:
                self.graph.end_capture_to_conditional_node()

    def launch(self) -> None:
        self.graph.replay()


class _ExtensionWhileGraph:
    """Parent graph with a WHILE node built by ``fsmooth._C`` around a kept captured body."""

    def __init__(self, body_fn, pred: torch.Tensor, max_trips: torch.Tensor, pool):
        # The body (and the pool holding its temporaries) must outlive the parent graph: keep it here.
        self.body = torch.cuda.CUDAGraph(keep_graph=True)
        with collector_paused(), torch.cuda.graph(self.body, pool=pool):
            body_fn()
        self.pred = pred
        self.loop = torch.classes.fsmooth.WhileLoopGraph(int(self.body.raw_cuda_graph()), pred, max_trips)

    @property
    def trips(self) -> torch.Tensor:
        return self.loop.trips()

    def launch(self) -> None:
        self.loop.launch()


class WhileLoop:
    """One launch runs ``body_fn`` while ``pred`` holds, at most ``max_trips`` times; ``initial_pred_fn``
    computes ``pred`` first.

    ``max_trips`` is a 0-dim int64 tensor on ``pred``'s device, read on the device at every trip: the
    caller may change it between launches (without a host sync) and :attr:`trips` counts the last launch's
    iterations.
    """

    def __init__(self, body_fn, initial_pred_fn, pred: torch.Tensor, pool, max_trips: torch.Tensor):
        if not isinstance(pred, torch.Tensor) or pred.dtype != torch.bool or pred.dim() != 0 or not pred.is_cuda:
            raise ValueError("pred must be a 0-dim bool CUDA tensor")
        if (not isinstance(max_trips, torch.Tensor) or max_trips.dtype != torch.int64 or max_trips.dim() != 0
                or max_trips.device != pred.device):
            raise ValueError(f"max_trips must be a 0-dim int64 tensor on pred's device ({pred.device})")
        self.initial_pred_fn = initial_pred_fn
        if native_while_available():
            self.impl, self.kind = _NativeWhileGraph(body_fn, initial_pred_fn, pred, max_trips, pool), "native"
        else:
            reason = extension_while_reason()
            if reason is not None:
                raise RuntimeError(f"cannot build a CUDA graph WHILE loop: {reason}")
            self.impl, self.kind = _ExtensionWhileGraph(body_fn, pred, max_trips, pool), "extension"

    @property
    def trips(self) -> torch.Tensor:
        """Iterations the last launch ran (0-dim int64 device tensor; read it after synchronizing)."""
        return self.impl.trips

    def launch(self) -> None:
        if self.kind == "extension":
            self.initial_pred_fn()  # a few tiny kernels on the current stream, no host sync
        self.impl.launch()


def capture_while_loop(body_fn, initial_pred_fn, pred: torch.Tensor, pool, max_trips: torch.Tensor) -> WhileLoop:
    return WhileLoop(body_fn, initial_pred_fn, pred, pool, max_trips)
