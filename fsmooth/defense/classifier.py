"""A classifier with Active Defense in front: the paper's "outerloop=K" evaluation model.

Why the straight-through gradient is exact
------------------------------------------
The defense maps ``x`` to ``T(x) = x + n - beta * sum_k g(t_k)`` where
``g(t) = dL_F/dt`` and ``t_k`` are the iterates. For a network made of
convolutions, eval-mode BatchNorm (a fixed affine map), ReLU, additions and
the per-channel input normalisation, every layer is piecewise linear, so the
prefix ``F(t)`` is piecewise linear in ``t``. ``L_F = mean|F - mean F|`` is a
composition of linear maps and ``|.|``, hence piecewise linear too. Inside
each linear piece ``L_F(t) = a^T t + c`` and its gradient ``g(t) = a`` is
constant, so ``dg/dt = 0`` almost everywhere (everywhere except on the
measure-zero boundaries where a ReLU or ``|.|`` switches, where autograd also
uses the zero second derivative). Differentiating the unrolled loop,

    dt_{k+1}/dt_k = I - beta * dg/dt(t_k) = I   (a.e.),

so ``dT/dx = I``: the exact gradient of the unrolled defense is the identity,
which is what ``t = x + (T(x) - x).detach()`` gives. The number of iterations
is a piecewise-constant function of ``x`` and contributes nothing either.
(Dropout in eval mode is the identity; max-pooling is piecewise linear too.
Smooth activations such as SiLU or GELU break the argument: then
straight-through is an approximation - BPDA.)

``tests/test_defense_gradient.py`` checks this against autograd through
unrolled ``create_graph=True`` steps on a small ReLU network.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .._validation import check_positive_int
from .api import ActiveDefense
from .config import DefenseConfig

__all__ = ["DefendedClassifier"]


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """``model`` in eval mode for the block; every module's own mode (mixed modes too) restored after."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, mode in modes:
            m.training = mode


class DefendedClassifier(nn.Module):
    """``model`` behind Active Defense, averaging ``outer_loops`` independent defenses.

    ``forward(x)`` (``x`` in [0, 1]) runs the K defenses of the batch in one engine
    call (the batch repeated K times, each copy with its own noise), classifies every
    defended copy with the full model in eval mode (BatchNorm running statistics, no
    dropout: whatever mode the caller left the model in, nothing is updated and no
    prediction depends on the rest of the batch; each module's mode is restored
    afterwards) and returns ``log(mean_k softmax(logits_k))``,
    a valid logit vector for cross-entropy-based attacks. The gradient with respect
    to ``x`` is straight-through the defense (exact for ReLU nets, see the module
    docstring). ``last_info`` holds the last :class:`DefenseResult`.

    Args:
        model: classifier on [0, 1] inputs (a submodule: ``.eval()`` and ``.to()`` reach it).
        config: :class:`DefenseConfig`; default: ``DefenseConfig.for_model(model)``, the model's
            calibrated sigma/beta/delta (``fsmooth calibrate``; ``model.defense_delta`` overrides delta), else the
            paper's values.
        outer_loops: K, the number of independent defended copies averaged.
        layer, engine, dtype: as for :class:`ActiveDefense`.
        generator: optional RNG for the noise (reproducible evaluations).
    """

    def __init__(self, model: nn.Module, config: DefenseConfig | None = None, outer_loops: int = 1, *,
                 layer: str | None = None, engine: str = "auto", dtype: torch.dtype | None = None,
                 generator: torch.Generator | None = None, **engine_options):
        super().__init__()
        check_positive_int(outer_loops, "outer_loops")
        self.model = model
        self.outer_loops = outer_loops
        self.generator = generator
        # Not a submodule attribute: the engine shares model's modules and holds graphs, not state.
        object.__setattr__(self, "defense", ActiveDefense(model, layer, config, engine=engine, dtype=dtype,
                                                          **engine_options))
        self.last_info = None

    @property
    def config(self) -> DefenseConfig:
        return self.defense.config

    def extra_repr(self) -> str:
        c = self.config
        return (f"outer_loops={self.outer_loops}, layer={self.defense.layer!r}, sigma={c.sigma}, beta={c.beta}, "
                f"delta={c.delta}, max_iters={c.max_iters}, engine={self.defense.engine!r}")

    def defend(self, x: torch.Tensor) -> torch.Tensor:
        """The K defended copies of ``x`` stacked as ``(K * B, ...)``, straight-through for gradients."""
        k = self.outer_loops
        repeated = x.repeat(k, *([1] * (x.dim() - 1))) if k > 1 else x
        info = self.defense(repeated.detach(), self.generator, return_info=True)
        self.last_info = info
        defended = info.inputs.to(x.dtype)
        # Straight-through: value of the defended input, gradient of the identity.
        return repeated + (defended - repeated).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, b = self.outer_loops, x.shape[0]
        defended = self.defend(x)
        with _eval_mode(self.model):
            logits = self.model(defended)
        log_probs = torch.log_softmax(logits.float(), dim=-1).view(k, b, logits.shape[-1])
        # log(mean_k softmax) computed stably in log space.
        return (torch.logsumexp(log_probs, dim=0) - math.log(k)).to(logits.dtype)
