"""FeatureSmoothingLoss: the formula, the delta branch, hooks and a real training step."""
import pytest
import torch
import torch.nn.functional as F

from fsmooth import FeatureSmoothingLoss
from fsmooth.models import WideResNet, prefix
from fsmooth.reference import feature_loss_reference


def tiny_wrn(seed=0):
    torch.manual_seed(seed)
    return WideResNet(10, 1, num_classes=5)


def test_value_matches_formula_and_components_are_exposed():
    model = tiny_wrn().eval()
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    feats = prefix(model, "block1")(x)
    lf = feature_loss_reference(feats)
    delta = float(lf.detach().median())  # half the samples below delta, half above
    with FeatureSmoothingLoss(model, "block1", delta=delta, weight=0.7) as criterion:
        logits = model(x)
        total = criterion(logits, y)
    expected = F.cross_entropy(logits, y) + 0.7 * lf.clamp_min(delta).mean()
    assert torch.allclose(total, expected, rtol=1e-6)
    assert torch.allclose(criterion.last["feature_loss"], lf.mean(), rtol=1e-6)
    assert torch.allclose(criterion.last["ce"], F.cross_entropy(logits, y))
    assert "delta=" in repr(criterion)


def test_samples_below_delta_get_no_feature_gradient():
    model = tiny_wrn().eval()
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        lf = feature_loss_reference(prefix(model)(x))
    delta = float(lf.sort().values[1:3].mean())  # exactly two samples above delta
    above = lf > delta
    xg = x.clone().requires_grad_()
    with FeatureSmoothingLoss(model, delta=delta, weight=1.0) as criterion:
        logits = model(xg)
        # Only the feature term: detach the logits' path by a zero-weight CE comparison below.
        total = criterion(logits, y)
    total.backward()
    grad_total = xg.grad.clone()
    xg.grad = None
    F.cross_entropy(model(xg), y).backward()
    feature_part = grad_total - xg.grad
    per_sample = feature_part.flatten(1).abs().sum(1)
    assert (per_sample[~above] < 1e-9).all() and (per_sample[above] > 1e-6).all()

    # delta=None: every sample gets the feature gradient.
    with FeatureSmoothingLoss(model, delta=None) as criterion:
        xg.grad = None
        criterion(model(xg), y).backward()
        with_all = xg.grad.clone()
    xg.grad = None
    F.cross_entropy(model(xg), y).backward()
    assert ((with_all - xg.grad).flatten(1).abs().sum(1) > 1e-6).all()


def test_one_sgd_step_lowers_the_total_loss():
    model = tiny_wrn(1).train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative statistics: the step is evaluated on the same batch
    torch.manual_seed(2)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 5, (8,))
    criterion = FeatureSmoothingLoss(model, delta=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.eval()
    with torch.no_grad():
        before = criterion(model(x), y).item()
    loss = criterion(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = criterion(model(x), y).item()
    criterion.close()
    assert after < before


def test_missing_forward_and_closed_hook_raise():
    model = tiny_wrn()
    criterion = FeatureSmoothingLoss(model)
    logits = model(torch.rand(2, 3, 32, 32))
    criterion(logits, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="did not run since the last call"):
        criterion(logits, torch.tensor([0, 1]))
    criterion.close()
    model(torch.rand(2, 3, 32, 32))
    with pytest.raises(RuntimeError, match="closed"):
        criterion(logits, torch.tensor([0, 1]))


def test_bad_arguments_name_the_argument():
    model = tiny_wrn()
    with pytest.raises(ValueError, match="block1"):
        FeatureSmoothingLoss(model, layer="blocks1")
    with pytest.raises(ValueError, match="delta"):
        FeatureSmoothingLoss(model, delta=-0.1)
    with pytest.raises(TypeError, match="weight"):
        FeatureSmoothingLoss(model, weight="1")


def test_works_through_data_parallel_wrapper():
    model = tiny_wrn()
    wrapped = torch.nn.DataParallel(model)  # on CPU DataParallel just calls the module
    with FeatureSmoothingLoss(wrapped) as criterion:
        total = criterion(wrapped(torch.rand(2, 3, 32, 32)), torch.tensor([0, 1]))
    assert torch.isfinite(total)
