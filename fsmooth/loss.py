"""Drop-in training loss: cross-entropy plus the feature-smoothing term of a hooked layer."""
from __future__ import annotations

import contextlib

import torch
from torch import nn
import torch.nn.functional as F

from ._validation import check_number
from .functional import check_backend, feature_loss
from .models.prefix import layer_module

__all__ = ["FeatureSmoothingLoss"]

_DATA_PARALLEL_ERROR = (
    "FeatureSmoothingLoss does not support nn.DataParallel over several devices ({}): its forward hook would "
    "see one activation per device, from several threads, and none of them holds the whole batch. Use "
    "torch.nn.parallel.DistributedDataParallel (one process per GPU: fsmooth.training.train under torchrun), "
    "or DataParallel over a single device")


class FeatureSmoothingLoss(nn.Module):
    """``CE(logits, target) + weight * mean_i max(L_F_i, delta)``.

    ``L_F_i`` is the feature loss of sample ``i`` at ``layer`` of ``model``,
    captured by a forward hook during the model's forward, so the module drops
    into an ordinary loop::

        criterion = FeatureSmoothingLoss(model)          # layer: model.default_layer
        loss = criterion(model(x), y)
        loss.backward()

    The per-sample max means a sample already below ``delta`` contributes a
    constant and no feature gradient; ``delta=None`` disables it. After each
    call, ``last`` holds the components as detached tensors (``ce``, ``feature_loss``:
    mean L_F, ``total``) for logging. Call :meth:`close` (or use ``with``) to
    remove the hook.

    Each loss call pairs with exactly one run of the hooked layer: if the layer
    ran more than once since the last call (a monitoring forward, an augmented
    view, a teacher sharing the layer), the call raises instead of silently
    using the last activation. Run such extra forwards inside
    :meth:`paused`. The activation is released as soon as a call consumes it.

    Multi-GPU training: use DistributedDataParallel. ``nn.DataParallel`` over several
    devices runs the layer once per device (per-device slices of the batch, from
    threads) and is refused, at construction or at the first loss call after it ran.
    """

    def __init__(self, model: nn.Module, layer: str | None = None, delta: float | None = 0.02,
                 weight: float = 1.0, backend: str = "auto"):
        super().__init__()
        if delta is not None:
            check_number(delta, "delta", min_value=0.0)
        check_number(weight, "weight", min_value=0.0)
        if isinstance(model, nn.DataParallel) and len(model.device_ids) > 1:
            devices = f"model is a DataParallel over {len(model.device_ids)} devices"
            raise ValueError(_DATA_PARALLEL_ERROR.format(devices))
        target = getattr(model, "_orig_mod", model)  # torch.compile's wrapper runs the original's hooks
        if isinstance(target, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            target = target.module
        target = getattr(target, "_orig_mod", target)
        self.layer = layer if layer is not None else getattr(target, "default_layer", None)
        module = layer_module(target, self.layer)
        self.delta = delta
        self.weight = weight
        self.backend = check_backend(backend)
        self.last: dict[str, float] = {}
        self._features: torch.Tensor | None = None
        self._runs = 0  # runs of the hooked layer since the last loss call
        self._replicated = False  # the layer ran as a DataParallel replica since the last loss call
        self._paused = False
        self._handle = module.register_forward_hook(self._capture)

    def _capture(self, module, inputs, output) -> None:
        if self._paused:
            return
        if getattr(module, "_is_replica", False):
            # DataParallel over several devices (wrapped after this loss was made): one replica per device,
            # each running this hook from its own thread. Only a flag is set here; the loss call refuses.
            self._replicated = True
            return
        self._runs += 1
        self._features = output

    @contextlib.contextmanager
    def paused(self):
        """Forwards inside this block are not captured (evaluation, monitoring, extra views)."""
        previous, self._paused = self._paused, True
        try:
            yield self
        finally:
            self._paused = previous

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self._handle is None:
            raise RuntimeError("FeatureSmoothingLoss was closed; its hook is removed")
        # Consume (and release) the activation whatever happens next.
        features, runs, replicated = self._features, self._runs, self._replicated
        self._features, self._runs, self._replicated = None, 0, False
        if replicated:
            raise RuntimeError(_DATA_PARALLEL_ERROR.format(f"layer {self.layer!r} ran in DataParallel replicas"))
        if features is None:
            raise RuntimeError(
                f"layer {self.layer!r} did not run since the last call: call the model before the loss")
        if runs > 1:
            raise RuntimeError(
                f"layer {self.layer!r} ran {runs} times since the last loss call, so it is ambiguous which "
                "activation belongs to these logits; run extra forwards (monitoring, augmented views, teachers) "
                "inside `with criterion.paused():`")
        if features.shape[0] != logits.shape[0]:
            raise ValueError(f"logits has batch {logits.shape[0]} but the hooked features have {features.shape[0]}")
        ce = F.cross_entropy(logits, target)
        lf = feature_loss(features, backend=self.backend)
        term = lf if self.delta is None else lf.clamp_min(self.delta)
        total = ce + self.weight * term.mean().to(ce.dtype)
        self.last = {"ce": ce.detach(), "feature_loss": lf.detach().mean(), "total": total.detach()}
        return total

    def close(self) -> None:
        """Remove the forward hook."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._features, self._runs, self._replicated = None, 0, False

    def __enter__(self) -> "FeatureSmoothingLoss":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}, delta={self.delta}, weight={self.weight}"
