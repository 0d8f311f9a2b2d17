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
"""
from __future__ import annotations

import functools

import torch

from .._ext import load_extension

__all__ = ["native_while_available", "extension_while_reason", "while_loop_unavailable_reason",
           "capture_while_loop"]


def native_while_available() -> bool:
    graph_type = getattr(torch.cuda, "CUDAGraph", None)
    return graph_type is not None and all(
        hasattr(graph_type, name) for name in
        ("begin_capture_to_while_node", "set_conditional_handle_for_current_node", "end_capture_to_conditional_node"))


@functools.lru_cache(maxsize=None)
def extension_while_reason() -> str | None:
    """``None`` when the ``fsmooth._C`` while-loop builder can run here, else why not."""
    module, reason = load_extension()
    if module is None:
        return reason
    if not hasattr(torch.ops.fsmooth, "while_loop_supported"):
        return "fsmooth._C was built without the while-loop op; rebuild it"
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
    """torch's own conditional-node capture."""

    def __init__(self, body_fn, initial_pred_fn, pred: torch.Tensor, pool):
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            initial_pred_fn()
            self.graph.begin_capture_to_while_node(pred)
            try:
                body_fn()
                self.graph.set_conditional_handle_for_current_node(pred)
            finally:
                self.graph.end_capture_to_conditional_node()

    def launch(self) -> None:
        self.graph.replay()


class _ExtensionWhileGraph:
    """Parent graph with a WHILE node built by ``fsmooth._C`` around a kept captured body."""

    def __init__(self, body_fn, pred: torch.Tensor, pool):
        # The body (and the pool holding its temporaries) must outlive the parent graph: keep it here.
        self.body = torch.cuda.CUDAGraph(keep_graph=True)
        with torch.cuda.graph(self.body, pool=pool):
            body_fn()
        self.pred = pred
        self.loop = torch.classes.fsmooth.WhileLoopGraph(int(self.body.raw_cuda_graph()), pred)

    def launch(self) -> None:
        self.loop.launch()


class WhileLoop:
    """One launch runs ``body_fn`` while ``pred`` holds; ``initial_pred_fn`` computes it first."""

    def __init__(self, body_fn, initial_pred_fn, pred: torch.Tensor, pool):
        if pred.dtype != torch.bool or pred.dim() != 0 or not pred.is_cuda:
            raise ValueError("pred must be a 0-dim bool CUDA tensor")
        self.initial_pred_fn = initial_pred_fn
        if native_while_available():
            self.impl, self.kind = _NativeWhileGraph(body_fn, initial_pred_fn, pred, pool), "native"
        else:
            reason = extension_while_reason()
            if reason is not None:
                raise RuntimeError(f"cannot build a CUDA graph WHILE loop: {reason}")
            self.impl, self.kind = _ExtensionWhileGraph(body_fn, pred, pool), "extension"

    def launch(self) -> None:
        if self.kind == "extension":
            self.initial_pred_fn()  # two tiny kernels on the current stream, no host sync
        self.impl.launch()


def capture_while_loop(body_fn, initial_pred_fn, pred: torch.Tensor, pool) -> WhileLoop:
    return WhileLoop(body_fn, initial_pred_fn, pred, pool)
