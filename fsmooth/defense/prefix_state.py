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

import torch
from torch import nn

from ..models.prefix import prefix as build_prefix
from ..models.prefix import resolve_layer

__all__ = ["EvalBatchNorm", "PrefixState", "indexed_device", "model_device"]

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


class EvalBatchNorm(nn.Module):
    """An eval-mode BatchNorm as the per-channel affine map it is: ``x * scale + shift``.

    The half-precision copy of the prefix runs its BatchNorms (those with running statistics) this way: the
    same function, but the input gradient is one elementwise product in the gradient's own layout. On CUDA,
    eval BatchNorm's backward (ATen's ``batch_norm_elementwise_backward_eval``) allocates its gradient as
    ``empty(input.sizes())``, NCHW whatever the input's layout, so the convolution before it copies that
    gradient back to channels_last in its own backward. On an H200 one iteration of the WRN-28-10 prefix to
    block1 (bf16, batch 512) did four such copies, 1.78 ms of device time; its eight BatchNorm backwards took
    3.3 ms more (measured with the reference loss) (``bench/copy_sources.py``; ``bench/results/gpu-copy-sources-20261126-0545/``).
    ``scale`` and ``shift`` are buffers refreshed in place from the model's BatchNorm (:meth:`refresh`), so
    captured graphs stay valid. In bf16 they are rounded once more than BatchNorm's fp32 internals: input
    gradients of a WRN-10-1 prefix differ from fp64 by 4-7% either way (``tests/test_prefix_state.py``).
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, dtype: torch.dtype):
        super().__init__()
        kw = dict(dtype=dtype, device=bn.running_mean.device)
        self.register_buffer("scale", torch.empty(bn.num_features, **kw))
        self.register_buffer("shift", torch.empty(bn.num_features, **kw))
        self.refresh(bn)

    @torch.no_grad()
    def refresh(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        """Recompute ``scale``/``shift`` from ``bn``'s weights and running statistics (in fp32 at least)."""
        acc = torch.promote_types(bn.running_var.dtype, torch.float32)
        scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.to(acc)
        shift = -bn.running_mean.to(acc) * scale
        if bn.bias is not None:
            shift = shift + bn.bias.to(acc)
        self.scale.copy_(scale)
        self.shift.copy_(shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(self.shift.view(shape), x, self.scale.view(shape))


def _eval_batchnorms(module: nn.Module) -> list[str]:
    """Names of the BatchNorms that eval mode turns into an affine map (those with running statistics)."""
    return [name for name, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
            and m.running_var is not None]


class PrefixState:
    """``model``'s prefix up to ``layer``, run in ``dtype``.

    ``dtype=None`` runs the prefix in the model's own parameter dtype with
    shared weights. Another dtype (bf16 for speed) uses a private copy of the
    prefix in that dtype, in channels_last layout, its eval BatchNorms run as
    affine maps (:class:`EvalBatchNorm`), whose weights are refreshed from the
    model at the start of every call (cheap next to hundreds of iterations, and
    never stale after training). The loop state ``t`` and the
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
        # The half-precision copy runs eval BatchNorms as EvalBatchNorm; False keeps them as BatchNorms (the
        # behaviour before 2026-11-26, for A/B benchmarks: set it before the first call builds the copy).
        self.affine_batchnorms = True
        self._compiled: tuple[nn.Module, object] | None = None  # (module, its compiled callable)

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
                for name in _eval_batchnorms(shadow) if self.affine_batchnorms else ():
                    parent, _, child = name.rpartition(".")
                    setattr(shadow.get_submodule(parent), child,
                            EvalBatchNorm(self.module.get_submodule(name), self.dtype))
            for p in shadow.parameters():
                p.requires_grad_(False)
            self._shadow = shadow
        return self._shadow

    def _refresh_copy(self, shadow: nn.Module) -> None:
        with torch.no_grad():
            src = dict(self.module.named_parameters())
            src.update(self.module.named_buffers())
            affine = {name: m for name, m in shadow.named_modules() if isinstance(m, EvalBatchNorm)}
            for name, dst in list(shadow.named_parameters()) + list(shadow.named_buffers()):
                if name.rpartition(".")[0] not in affine:
                    dst.copy_(src[name])
            for name, m in affine.items():
                m.refresh(self.module.get_submodule(name))

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
