"""The part of a network that computes its input -> one layer's output, and nothing after it.

Active Defense only needs the features of one layer, so it runs this prefix
inside its loop instead of the whole network. Models may provide
``model.prefix(layer)`` (the WRN builds it directly); any other model is
traced with :mod:`torch.fx` and the graph is cut after the layer's last call.
"""
from __future__ import annotations

import difflib

from torch import fx, nn

__all__ = ["prefix", "resolve_layer", "unknown_layer_error", "layer_module"]


def unknown_layer_error(model: nn.Module, layer, candidates=None) -> ValueError:
    """A ``ValueError`` naming ``layer`` and the closest existing layer names."""
    names = list(candidates) if candidates is not None else [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(str(layer), names, n=5, cutoff=0.4)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    return ValueError(f"layer {layer!r} is not a module of {type(model).__name__}{hint} (layers: {shown})")


def resolve_layer(model: nn.Module, layer: str | None) -> str:
    """``layer``, or the model's ``default_layer`` when ``None``; checked to exist."""
    if layer is None:
        layer = getattr(model, "default_layer", None)
        if layer is None:
            raise ValueError(f"layer must be given: {type(model).__name__} has no default_layer")
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a str, got {type(layer).__name__}")
    names = {n for n, _ in model.named_modules() if n}
    if layer not in names:
        raise unknown_layer_error(model, layer)
    return layer


def layer_module(model: nn.Module, layer: str | None) -> nn.Module:
    """The submodule named ``layer`` (or the model's default)."""
    return model.get_submodule(resolve_layer(model, layer))


class _Tracer(fx.Tracer):
    """Keeps the named layer a leaf so its output is a single graph node."""

    def __init__(self, layer: str):
        super().__init__()
        self.layer = layer

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname == self.layer or super().is_leaf_module(m, qualname)


def _traced_prefix(model: nn.Module, layer: str) -> fx.GraphModule:
    tracer = _Tracer(layer)
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        raise ValueError(
            f"cannot build a prefix of {type(model).__name__} up to {layer!r}: torch.fx tracing failed "
            f"({type(exc).__name__}: {exc}); give the model a prefix(layer) method"
        ) from exc
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
    if not calls:
        raise ValueError(f"layer {layer!r} is never called in {type(model).__name__}.forward")
    if len(calls) > 1:
        raise ValueError(f"layer {layer!r} is called {len(calls)} times in {type(model).__name__}.forward; "
                         "its output is ambiguous")
    cut = calls[0]
    module = fx.GraphModule(model, graph, class_name=f"{type(model).__name__}Prefix")
    for node in list(module.graph.nodes):
        if node.op == "output":
            module.graph.erase_node(node)
    module.graph.output(cut)
    module.graph.eliminate_dead_code()  # drops everything after the cut
    module.graph.lint()
    module.recompile()
    module.delete_all_unused_submodules()
    return module


def prefix(model: nn.Module, layer: str | None = None) -> nn.Module:
    """A module computing ``model``'s input -> ``layer`` output, sharing ``model``'s parameters.

    Uses ``model.prefix(layer)`` when the model defines it, else torch.fx.
    ``layer=None`` takes ``model.default_layer``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layer = resolve_layer(model, layer)
    if callable(getattr(model, "prefix", None)):
        return model.prefix(layer)
    return _traced_prefix(model, layer)
