"""The divergence guard: a sample whose loss keeps rising or whose input runs away is flagged and warned about."""
import warnings

import pytest
import torch
from torch import nn

from fsmooth.defense import ActiveDefense, DefenseConfig, DefenseDivergedWarning
from fsmooth.defense.config import DIVERGENCE_PATIENCE, MAX_DISPLACEMENT

from test_defense import BETA, initial_losses, noise_for, tiny_wrn, varied_inputs
from test_defense_runner import CpuRunner


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


class ReverseGradient(nn.Module):
    """Identity forward, negated backward: every update climbs L_F (a broken prefix gradient)."""

    def forward(self, x):
        return _ReverseGradient.apply(x)


def _defend(model, x, noise, config, engine="eager"):
    defense = ActiveDefense(model, config=config, engine=engine)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = defense(x, return_info=True, noise=noise)
    return info, [w for w in caught if issubclass(w.category, DefenseDivergedWarning)]


def test_huge_step_diverges_and_warns_once_naming_the_fix():
    model = tiny_wrn()
    x = varied_inputs(5)
    noise = noise_for(x, 0.075, seed=3)
    info, caught = _defend(model, x, noise, DefenseConfig(beta=1e4, delta=1e-6, max_iters=5))
    distance = (info.inputs - x).abs().flatten(1).amax(1)
    assert bool((distance > MAX_DISPLACEMENT).all())
    assert info.diverged.tolist() == [True] * 5 and info.num_diverged == 5
    assert info.summary()["diverged"] == 5
    assert len(caught) == 1  # once per call, not once per sample
    message = str(caught[0].message)
    assert "5 of 5" in message and "beta=10000" in message and "fsmooth calibrate" in message


def test_silent_in_the_small_step_regime():
    model = tiny_wrn()
    x = varied_inputs(6)
    noise = noise_for(x, 0.075, seed=4)
    delta = 0.9 * float(initial_losses(model, x + noise).min())
    info, caught = _defend(model, x, noise, DefenseConfig(beta=BETA / 10, delta=delta, max_iters=500))
    assert bool(info.converged.all()) and int(info.iterations.max()) >= 50  # many small steps
    assert not info.diverged.any() and caught == []


def test_rising_loss_streak_is_caught_by_eager_and_graph_runner_alike():
    model = tiny_wrn()
    model.conv1 = nn.Sequential(model.conv1, ReverseGradient())
    x = varied_inputs(5)
    noise = noise_for(x, 0.075, seed=5)
    delta = float(initial_losses(model, x + noise).min()) / 2  # never reached: the loss only rises
    steps = DIVERGENCE_PATIENCE + 5
    config = DefenseConfig(beta=0.05, delta=delta, max_iters=steps)
    info, caught = _defend(model, x, noise, config)
    assert info.iterations.tolist() == [steps] * 5
    assert bool((info.feature_loss.double() > initial_losses(model, x + noise)).all())
    distance = (info.inputs - x).abs().flatten(1).amax(1)
    assert bool((distance < MAX_DISPLACEMENT).all())  # only the streak can have fired
    assert info.diverged.tolist() == [True] * 5 and len(caught) == 1

    # One step short of the patience: nothing fires.
    short, caught = _defend(model, x, noise, config.replace(max_iters=DIVERGENCE_PATIENCE - 2))
    assert not short.diverged.any() and caught == []

    defense = ActiveDefense(model, config=config, engine="eager")
    runner = CpuRunner(defense.prefix, x.device, tuple(x.shape[1:]), mode="graph", max_batch=2)
    with torch.no_grad(), defense.prefix.session() as module:
        _, iterations, _, grew, _ = runner.run(module, x + noise, config)
    assert iterations.tolist() == [steps] * 5 and grew.tolist() == [True] * 5


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_result_counts_as_diverged(bad):
    from fsmooth.defense.api import _diverged
    x = varied_inputs(3)
    t = x.clone()
    t[1, 0, 0, 0] = bad
    flags = _diverged(torch.zeros(3, dtype=torch.bool), t, x)
    assert flags.tolist() == [False, True, False]
