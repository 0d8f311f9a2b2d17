"""Drop-in training loss: cross-entropy plus the feature-smoothing term of a hooked layer."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from ._validation import check_number
from .functional import feature_loss
from .models.prefix import layer_module

__all__ = ["FeatureSmoothingLoss"]


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
    """

    def __init__(self, model: nn.Module, layer: str | None = None, delta: float | None = 0.02,
                 weight: float = 1.0, backend: str = "auto"):
        super().__init__()
        if delta is not None:
            check_number(delta, "delta", min_value=0.0)
        check_number(weight, "weight", min_value=0.0)
        target = model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model
        self.layer = layer if layer is not None else getattr(target, "default_layer", None)
        module = layer_module(target, self.layer)
        self.delta = delta
        self.weight = weight
        self.backend = backend
        self.last: dict[str, float] = {}
        self._features: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._capture)

    def _capture(self, module, inputs, output) -> None:
        self._features = output

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self._handle is None:
            raise RuntimeError("FeatureSmoothingLoss was closed; its hook is removed")
        features, self._features = self._features, None
        if features is None:
            raise RuntimeError(
                f"layer {self.layer!r} did not run since the last call: call the model before the loss")
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
        self._features = None

    def __enter__(self) -> "FeatureSmoothingLoss":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}, delta={self.delta}, weight={self.weight}"
