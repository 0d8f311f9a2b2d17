"""The network prefix as the defense loop runs it: compute dtype, layout, eval mode, frozen weights.

The loop differentiates only with respect to its input, so for its duration
the prefix's parameters stop requiring gradients (no weight gradients are
computed, no ``.grad`` is created) and every module runs in eval mode
(BatchNorm uses running statistics, dropout is off: the per-sample semantics
need a deterministic, batch-independent prefix). Both are restored afterwards.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import types

import torch
from torch import nn

from ..functional import _interpret_requested
from ..models.prefix import prefix as build_prefix
from ..models.prefix import resolve_layer

__all__ = ["PrefixState", "indexed_device", "model_device", "runs_affine"]

_HALF = (torch.float16, torch.bfloat16)
_COMPUTE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def indexed_device(device) -> torch.device:
    """``device`` with its index filled in: ``torch.Generator(device="cuda")`` reports ``cuda``, its
    tensors ``cuda:0``; both name the current device, and must compare equal."""
    device = torch.device(device)
    if device.index is None and device.type not in ("cpu", "meta"):
        current = getattr(getattr(torch, device.type, None), "current_device", None)
        return torch.device(device.type, current() if current is not None else 0)  # mps has one device: 0
    return device


def model_device(model: nn.Module) -> torch.device | None:
    """Device of the model's first parameter or buffer (``None`` for a stateless model)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return None


def _param_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


# The buffers an affine BatchNorm of the copy gets (refreshed in place: captured graphs keep their addresses),
# and the attribute that lets it run the Triton kernel.
_SCALE, _SHIFT, _KERNEL = "fsmooth_affine_scale", "fsmooth_affine_shift", "fsmooth_affine_kernel"


@functools.lru_cache(maxsize=None)
def _channel_affine_module():
    """:mod:`fsmooth.kernels.channel_affine`, or ``None`` where Triton cannot be imported."""
    try:
        from ..kernels import channel_affine
    except Exception:  # ImportError, or a Triton without a usable backend: addcmul does the same, slower
        return None
    return channel_affine


def _kernel_runs(x: torch.Tensor) -> bool:
    """The Triton kernel takes ``x``: a CUDA tensor (or CPU under ``TRITON_INTERPRET=1``, for tests) in a
    layout it reads."""
    if x.device.type != "cuda" and not (x.device.type == "cpu" and _interpret_requested()):
        return False
    module = _channel_affine_module()
    return module is not None and module.supports(x)


def _affine_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    scale, shift = getattr(self, _SCALE), getattr(self, _SHIFT)
    if getattr(self, _KERNEL) and _kernel_runs(x):
        return _channel_affine_module().channel_affine_function(x, scale, shift)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.view(shape), x, scale.view(shape))


def runs_affine(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm of a prefix copy that runs as ``x * scale + shift``."""
    return hasattr(module, _SCALE)


def _affine_candidate(module: nn.Module) -> bool:
    """A stock BatchNorm (its forward not overridden) that eval mode makes an affine map: running statistics."""
    return (isinstance(module, nn.modules.batchnorm._BatchNorm)
            and type(module).forward is nn.modules.batchnorm._BatchNorm.forward
            and module.running_mean is not None and module.running_var is not None)


@torch.no_grad()
def _refresh_affine(copy_bn: nn.Module, source_bn: nn.modules.batchnorm._BatchNorm) -> None:
    """``scale``/``shift`` of ``copy_bn`` from ``source_bn``'s weights and running statistics (fp32 at least)."""
    acc = torch.promote_types(source_bn.running_var.dtype, torch.float32)
    scale = torch.rsqrt(source_bn.running_var.to(acc) + source_bn.eps)
    if source_bn.weight is not None:
        scale = scale * source_bn.weight.to(acc)
    shift = -source_bn.running_mean.to(acc) * scale
    if source_bn.bias is not None:
        shift = shift + source_bn.bias.to(acc)
    getattr(copy_bn, _SCALE).copy_(scale)
    getattr(copy_bn, _SHIFT).copy_(shift)


def _make_affine(copy_bn: nn.modules.batchnorm._BatchNorm, source_bn: nn.modules.batchnorm._BatchNorm, *,
                 kernel: bool = False) -> None:
    """Make the copy's BatchNorm ``copy_bn`` run as the affine map it is in eval mode, in place.

    Why: the input gradient of ``x * scale + shift`` is one elementwise product that keeps the gradient's
    layout. On CUDA, eval BatchNorm's own backward (ATen's ``batch_norm_elementwise_backward_eval``) allocates
    its gradient as ``empty(input.sizes())``, NCHW whatever the input's layout, so the convolution before it
    copies that gradient back to channels_last in its own backward: four full 512x160x32x32 copies (1.78 ms of
    device time) per iteration of the WRN-28-10 prefix to block1 in bf16 on an H200
    (``bench/results/gpu-copy-sources-20261126-0545/``; ``bench/results/gpu-runs-20261126.md``). The module
    stays what it was (its class, attributes and hooks); only its forward is replaced, on this instance.

    ``kernel``: run the map with the Triton kernel (:mod:`fsmooth.kernels.channel_affine`) where it applies
    (a channels-last CUDA tensor), not with ``addcmul``, which ATen runs through its strided, non-vectorized
    loop for a per-channel operand, forward and backward.
    """
    kw = dict(dtype=copy_bn.running_mean.dtype, device=copy_bn.running_mean.device)
    copy_bn.register_buffer(_SCALE, torch.empty(copy_bn.num_features, **kw))
    copy_bn.register_buffer(_SHIFT, torch.empty(copy_bn.num_features, **kw))
    _refresh_affine(copy_bn, source_bn)
    setattr(copy_bn, _KERNEL, bool(kernel))
    copy_bn.forward = types.MethodType(_affine_forward, copy_bn)


class PrefixState:
    """``model``'s prefix up to ``layer``, run in ``dtype``.

    ``dtype=None`` runs the prefix in the model's own parameter dtype with
    shared weights. Another dtype (bf16 for speed) uses a private copy of the
    prefix in that dtype, in channels_last layout, whose weights are refreshed
    from the model at the start of every call (cheap next to hundreds of
    iterations, and never stale after training). In bf16 the copy's stock
    BatchNorms run as the affine maps they are in eval mode (:func:`_make_affine`;
    ``affine_batchnorms = False`` keeps them, for A/B benchmarks), on channels-last CUDA tensors with a
    Triton kernel unless the prefix is compiled (Inductor fuses the map itself) or ``affine_kernel = False``
    (``addcmul``, for A/B benchmarks). The loop state ``t`` and the
    loss stay fp32 (fp64 when the prefix is fp64).

    ``compile_prefix``: run the prefix (forward, and its backward through
    AOTAutograd) ``torch.compile``-d, with a symbolic batch size (only) so that
    the buckets a graph engine captures share a compilation: ``True`` (Inductor)
    or a backend name (``"aot_eager"`` checks the plumbing without a compiler).
    """

    def __init__(self, model: nn.Module, layer: str | None = None, dtype: torch.dtype | None = None,
                 compile_prefix: bool | str = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if dtype is not None and dtype not in _COMPUTE_DTYPES:
            raise TypeError(f"dtype must be None or one of {_COMPUTE_DTYPES}, got {dtype!r}")
        self.layer = resolve_layer(model, layer)
        self.module = build_prefix(model, self.layer)
        self.model_dtype = _param_dtype(model)
        self.dtype = dtype or self.model_dtype
        self.channels_last = self.dtype in _HALF
        self.state_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        self._shadow = None
        if not isinstance(compile_prefix, (bool, str)) or compile_prefix == "":
            raise TypeError(f"compile_prefix must be a bool or a torch.compile backend name, got {compile_prefix!r}")
        if isinstance(compile_prefix, str):
            from torch import _dynamo
            known = set(_dynamo.list_backends(exclude_tags=())) - {"cudagraphs"}
            if compile_prefix not in known:
                raise ValueError(f"compile_prefix must be True or a torch.compile backend ({', '.join(sorted(known))}; "
                                 f"not 'cudagraphs': the engines capture graphs themselves), got {compile_prefix!r}")
        self.compile_prefix = compile_prefix
        self._affine_batchnorms = True
        self._affine_kernel = True
        self._compiled: tuple[nn.Module, object] | None = None  # (module, its compiled callable)

    def _switch_copy(self, name: str, value: bool) -> None:
        """Set the copy-building switch ``name``; a change drops the copy (and its compilation), rebuilt at the
        next call."""
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        if value != getattr(self, "_" + name):
            setattr(self, "_" + name, value)
            self._shadow = self._compiled = None

    @property
    def affine_batchnorms(self) -> bool:
        """bf16 copies run their stock BatchNorms as affine maps (default); False keeps them (the behaviour
        before 2026-11-26). Changing it drops the copy, rebuilt at the next call."""
        return self._affine_batchnorms

    @affine_batchnorms.setter
    def affine_batchnorms(self, value: bool) -> None:
        self._switch_copy("affine_batchnorms", value)

    @property
    def affine_kernel(self) -> bool:
        """The affine BatchNorms run the Triton kernel where it applies (default; never with ``compile_prefix``);
        False runs them with ``addcmul``. Changing it drops the copy, rebuilt at the next call."""
        return self._affine_kernel

    @affine_kernel.setter
    def affine_kernel(self, value: bool) -> None:
        self._switch_copy("affine_kernel", value)

    @property
    def runs_copy(self) -> bool:
        return self.dtype != self.model_dtype

    def _compute_module(self) -> nn.Module:
        if not self.runs_copy:
            return self.module
        if self._shadow is None or model_device(self._shadow) != model_device(self.module):
            with torch.no_grad():
                shadow = copy.deepcopy(self.module).to(dtype=self.dtype)
                if self.channels_last:
                    shadow = shadow.to(memory_format=torch.channels_last)
                # bf16 only: its range is fp32's, so shift = bias - mean * scale cannot overflow (fp16's can).
                if self._affine_batchnorms and self.dtype == torch.bfloat16:
                    for name, m in shadow.named_modules():  # an aliased module comes once, with its first name
                        if _affine_candidate(m):
                            _make_affine(m, self.module.get_submodule(name),
                                         kernel=self._affine_kernel and not self.compile_prefix)
            for p in shadow.parameters():
                p.requires_grad_(False)
            self._shadow = shadow
        return self._shadow

    def _refresh_copy(self, shadow: nn.Module) -> None:
        with torch.no_grad():
            src = dict(self.module.named_parameters())
            src.update(self.module.named_buffers())
            for name, dst in list(shadow.named_parameters()) + list(shadow.named_buffers()):
                if name.rpartition(".")[2] not in (_SCALE, _SHIFT):
                    dst.copy_(src[name])
            for name, m in shadow.named_modules():
                if runs_affine(m):
                    _refresh_affine(m, self.module.get_submodule(name))

    @contextlib.contextmanager
    def session(self):
        """Eval mode and frozen weights for the duration of a call; yields the module to run."""
        module = self._compute_module()
        # The prefix shares the model's modules: only those run here, so only their modes change.
        modules = list(dict.fromkeys(list(self.module.modules()) + list(module.modules())))
        modes = [(m, m.training) for m in modules]
        params = list(dict.fromkeys(list(self.module.parameters()) + list(module.parameters())))
        flags = [(p, p.requires_grad) for p in params]
        try:
            for m in modules:
                m.training = False
            for p in params:
                p.requires_grad_(False)
            if module is not self.module:
                self._refresh_copy(module)
            yield module
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
            for m, flag in modes:
                m.training = flag

    def _callable(self, module: nn.Module):
        if self.compile_prefix is False:
            return module
        if self._compiled is None or self._compiled[0] is not module:
            from torch import _dynamo
            backend = "inductor" if self.compile_prefix is True else self.compile_prefix
            compiled = torch.compile(module, backend=backend)

            def run(x: torch.Tensor) -> torch.Tensor:
                # Only the batch is symbolic (one compilation for every bucket but size 1); channels and
                # image size stay static, which keeps Inductor's layout choices for the convolutions.
                _dynamo.maybe_mark_dynamic(x, 0)
                return compiled(x)

            self._compiled = (module, run)
        return self._compiled[1]

    def features(self, module: nn.Module, t: torch.Tensor) -> torch.Tensor:
        """The layer's output for loop state ``t`` (fp32/fp64), computed in the prefix dtype."""
        x = t.to(self.dtype)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._callable(module)(x)
