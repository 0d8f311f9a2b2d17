"""DefendedClassifier: outer-loop aggregation and the straight-through gradient."""
import math
import warnings

import pytest
import torch
from torch import nn

from fsmooth.defense import ActiveDefense, DefendedClassifier, DefenseConfig, DefenseNotConvergedWarning
from fsmooth.reference import feature_loss_reference


class TinyNet(nn.Module):
    """conv-BN(eval)-ReLU-conv features, then a head; ``activation`` lets a test break piecewise linearity."""

    default_layer = "features"

    def __init__(self, activation=nn.ReLU):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), activation(),
                                      nn.Conv2d(6, 5, 3, padding=1))
        self.head = nn.Sequential(activation(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(20, 4))
        bn = self.features[1]
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)

    def forward(self, x):
        return self.head(self.features(x))


def unrolled(model, x, noise, beta, steps):
    """``steps`` Algorithm-1 updates kept in the autograd graph (create_graph=True)."""
    t = x + noise
    for _ in range(steps):
        loss = feature_loss_reference(model.features(t)).sum()
        (g,) = torch.autograd.grad(loss, t, create_graph=True)
        t = t - beta * g
    return t


@pytest.mark.parametrize("activation, exact", [(nn.ReLU, True), (nn.Softplus, False)])
def test_straight_through_equals_unrolled_gradient(activation, exact):
    torch.manual_seed(0)
    model = TinyNet(activation).double().eval()
    x = torch.rand(2, 3, 6, 7, dtype=torch.float64)
    noise = (torch.rand_like(x) * 2 - 1) * 0.075
    weights = torch.randn(2, 4, dtype=torch.float64)
    steps, beta = 4, 2.0
    config = DefenseConfig(beta=beta, delta=1e-9, max_iters=steps)

    x_exact = x.clone().requires_grad_(True)
    t = unrolled(model, x_exact, noise, beta, steps)
    (model(t) * weights).sum().backward()

    defense = ActiveDefense(model, config=config, engine="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DefenseNotConvergedWarning)
        result = defense(x, return_info=True, noise=noise)
    assert result.iterations.tolist() == [steps, steps]
    assert (result.inputs - t.detach()).abs().max() < 1e-12  # same forward trajectory
    assert (result.inputs - x - noise).abs().max() > 1e-3  # and it really moved
    x_st = x.clone().requires_grad_(True)
    t_st = x_st + (result.inputs - x_st).detach()
    (model(t_st) * weights).sum().backward()
    err = ((x_st.grad - x_exact.grad).norm() / x_exact.grad.norm()).item()
    if exact:
        assert err < 1e-10
    else:  # smooth activations: straight-through is only an approximation (the test can tell)
        assert err > 1e-6


def test_classifier_equals_manual_outer_loop_average():
    torch.manual_seed(1)
    model = TinyNet().eval()
    x = torch.rand(3, 3, 6, 6)
    config = DefenseConfig(beta=2.0, delta=0.05, max_iters=5)
    k = 3
    clf = DefendedClassifier(model, config, outer_loops=k, engine="eager",
                             generator=torch.Generator().manual_seed(11))
    assert "outer_loops=3" in repr(clf) and "delta=0.05" in repr(clf)
    xg = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DefenseNotConvergedWarning)
        out = clf(xg)
        out.sum().backward()
        # Manual: the same noise draw for the repeated batch, K separate defenses, softmax average.
        defense = ActiveDefense(model, config=config, engine="eager")
        repeated = x.repeat(k, 1, 1, 1)
        noise = defense.draw_noise(repeated, torch.Generator().manual_seed(11))
        xm = x.clone().requires_grad_(True)
        probs = 0
        for i in range(k):
            part = slice(i * 3, (i + 1) * 3)
            t = defense(x, noise=noise[part])
            probs = probs + torch.softmax(model(xm + (t - xm).detach()), dim=-1)
        manual = torch.log(probs / k)
        manual.sum().backward()
        copies = clf.defend(x).view(k, 3, -1)
    assert out.shape == (3, 4)
    assert (out - manual).abs().max() < 1e-5
    assert (xg.grad - xm.grad).abs().max() < 1e-5 and xg.grad.abs().sum() > 0
    assert clf.last_info.iterations.shape == (k * 3,)
    # The K copies got different noise, so the defended copies differ.
    assert (copies[0] - copies[1]).abs().max() > 1e-3
    # log-mean-softmax is a normalised log-distribution.
    assert torch.allclose(out.exp().sum(-1), torch.ones(3), atol=1e-5)
    assert math.isfinite(float(out.detach().sum()))


def test_classifier_checks_outer_loops_and_handles_empty():
    model = TinyNet().eval()
    with pytest.raises(ValueError, match="outer_loops"):
        DefendedClassifier(model, outer_loops=0)
    clf = DefendedClassifier(model, outer_loops=2, engine="eager")
    assert clf(torch.rand(0, 3, 6, 6)).shape == (0, 4)


def test_classifier_classifies_in_eval_mode_and_restores_the_modes():
    torch.manual_seed(2)
    model = TinyNet()
    model.train()
    model.head.eval()  # a mixed-mode model
    modes = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = DefenseConfig(beta=2.0, delta=0.05, max_iters=3)
    x = torch.rand(4, 3, 6, 6)

    def classify(inputs):
        clf = DefendedClassifier(model, config, outer_loops=2, engine="eager",
                                 generator=torch.Generator().manual_seed(3))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return clf(inputs)

    in_train_mode = classify(x)
    for k, v in model.state_dict().items():  # BatchNorm statistics untouched
        assert torch.equal(v, state[k]), k
    assert {name: m.training for name, m in model.named_modules()} == modes
    model.eval()
    assert torch.equal(in_train_mode, classify(x))  # the same as an eval-mode model's predictions
    model.train()
    # No prediction depends on the rest of the batch: another image in the batch changes nothing.
    other = torch.cat([x[:2], torch.rand(2, 3, 6, 6).pow(3)])
    assert (classify(other)[:2] - in_train_mode[:2]).abs().max() < 1e-5
