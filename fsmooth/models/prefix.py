"""The part of a network that computes its input -> one layer's output, and nothing after it.

Active Defense only needs the features of one layer, so it runs this prefix
inside its loop instead of the whole network. Models may provide
``model.prefix(layer)`` (the WRN builds it directly); any other model is
traced with :mod:`torch.fx` and the graph is cut after the layer's last call.

A traced prefix is the model's eval-mode computation: tracing bakes Python values
into the graph, so the model is traced with every module in eval mode (a
``F.dropout(h, training=self.training)`` is recorded off, a functional
``F.batch_norm`` with running statistics), whatever mode it was in. Its
submodules, parameters and root-level buffers are the model's own, read at call
time (see :class:`_RootTensors`).
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


class _RootTensors(nn.Module):
    """The parameters and buffers registered on ``model`` itself, as the model holds them now.

    A GraphModule copies a root-level tensor (``self.register_buffer("mu", ...)`` in the model's
    ``__init__``) by reference, and ``model.to()`` (``Module._apply``) replaces every buffer with a new
    tensor, so the prefix would go on reading the old one. The parameter and buffer dicts of this module
    *are* the model's, so the prefix reads whatever the model holds at call time: moved, cast, reassigned.
    A deep copy (the half-precision copy of ``PrefixState``) gets dicts of its own, as a copy should.
    Tensors the model keeps as plain attributes (not registered) are copied at tracing, as torch.fx does.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self._parameters = model._parameters
        self._buffers = model._buffers
        self._non_persistent_buffers_set = model._non_persistent_buffers_set


def _trace_in_eval_mode(tracer: fx.Tracer, model: nn.Module) -> fx.Graph:
    """``model``'s graph traced with every module in eval mode; each module's own mode is restored after."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in modes:
            m.training = False
        return tracer.trace(model)
    finally:
        for m, mode in modes:
            m.training = mode


def _read_root_tensors_live(module: fx.GraphModule, model: nn.Module) -> None:
    """Point ``module``'s reads of ``model``'s root-level parameters and buffers at a :class:`_RootTensors`."""
    nodes = [n for n in module.graph.nodes if n.op == "get_attr" and "." not in n.target
             and (n.target in model._parameters or n.target in model._buffers)]
    if not nodes:
        return
    name = "fsmooth_root"
    while hasattr(module, name):
        name += "_"
    module.add_submodule(name, _RootTensors(model))
    for node in nodes:
        if hasattr(module, node.target):  # the copy GraphModule made (once per name)
            delattr(module, node.target)
        node.target = f"{name}.{node.target}"


def _traced_prefix(model: nn.Module, layer: str) -> fx.GraphModule:
    tracer = _Tracer(layer)
    try:
        graph = _trace_in_eval_mode(tracer, model)
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
    _read_root_tensors_live(module, model)
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

    Uses ``model.prefix(layer)`` when the model defines it, else torch.fx (the eval-mode computation,
    reading the model's current tensors: see the module docstring).
    ``layer=None`` takes ``model.default_layer``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layer = resolve_layer(model, layer)
    if callable(getattr(model, "prefix", None)):
        return model.prefix(layer)
    return _traced_prefix(model, layer)
