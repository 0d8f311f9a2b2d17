"""FeatureSmoothingLoss: the formula, the delta branch, hooks and a real training step."""
import copy
import threading

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
    with pytest.raises(ValueError, match="backend"):
        FeatureSmoothingLoss(model, backend="bogus")


def test_works_through_data_parallel_wrapper():
    model = tiny_wrn()
    wrapped = torch.nn.DataParallel(model)  # on CPU DataParallel just calls the module
    with FeatureSmoothingLoss(wrapped) as criterion:
        total = criterion(wrapped(torch.rand(2, 3, 32, 32)), torch.tensor([0, 1]))
    assert torch.isfinite(total)


def test_works_on_a_torch_compile_wrapped_model():
    """``torch.compile(model)`` is an OptimizedModule holding the model as ``_orig_mod``: the loss hooks the
    original's layer, and matches the loss made from the bare model (eager backend: no compiler on CI)."""
    torch.manual_seed(5)
    model = tiny_wrn().eval()
    x, y = torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 2])
    with FeatureSmoothingLoss(model, delta=0.0) as criterion:
        expected = criterion(model(x), y)
    compiled = torch.compile(model, backend="eager")
    with FeatureSmoothingLoss(compiled, delta=0.0) as criterion:
        total = criterion(compiled(x), y)
    torch.testing.assert_close(total, expected)


def _feature_term_reference(model, x, delta, weight):
    """``weight * mean_i max(L_F_i, delta)`` by plain float64 autograd: an independent transcription."""
    f = prefix(model, "block1")(x).flatten(1)
    lf = (f - f.mean(1, keepdim=True)).abs().mean(1)
    return weight * lf.clamp_min(delta).mean()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_feature_term_parameter_gradient_matches_autograd_of_the_reference(backend, interpret_triton):
    """The loss's feature term moves the weights exactly as autograd of the formula does (sign included)."""
    model = tiny_wrn(3).eval()
    dtype = torch.float64 if backend == "reference" else torch.float32
    model = model.to(dtype)
    reference_model = copy.deepcopy(model).double()
    torch.manual_seed(4)
    x, y = torch.rand(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (6,))
    with torch.no_grad():
        lf = feature_loss_reference(prefix(reference_model, "block1")(x))
    delta = float(lf.median())  # some samples clamp (no feature gradient), some do not
    weight = 0.7
    params = list(model.parameters())
    with FeatureSmoothingLoss(model, delta=delta, weight=weight, backend=backend) as criterion:
        logits = model(x.to(dtype))
        total = criterion(logits, y)
    ce = F.cross_entropy(logits, y)
    g_total = torch.autograd.grad(total, params, retain_graph=True)
    g_ce = torch.autograd.grad(ce, params)
    ref = _feature_term_reference(reference_model, x, delta, weight)
    g_ref = torch.autograd.grad(ref, list(reference_model.parameters()), allow_unused=True)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    checked = 0
    for (name, _), a, b, r in zip(model.named_parameters(), g_total, g_ce, g_ref):
        feature_part = (a - b).double()
        if r is None or not r.abs().sum():  # after block1: the feature term does not reach it
            assert feature_part.abs().max() < tol, name
            continue
        assert ((feature_part - r).norm() / r.norm()).item() < tol, name
        checked += 1
    assert checked >= 3  # conv1 and block1's convolutions get a real feature gradient


def test_a_second_forward_before_the_loss_is_an_error_not_a_silent_switch():
    model = tiny_wrn().eval()
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    other = torch.rand(4, 3, 8, 8)
    with FeatureSmoothingLoss(model, delta=0.0) as criterion:
        logits = model(x)
        with torch.no_grad():
            model(other)  # e.g. a monitoring forward on another batch
        with pytest.raises(RuntimeError, match="ran 2 times since the last loss call"):
            criterion(logits, y)
        # The stored activation was released: the next pair works.
        logits = model(x)
        expected = criterion(logits, y)
        # Extra forwards inside paused() are not captured, and the loss keeps its own activation.
        logits = model(x)
        with criterion.paused(), torch.no_grad():
            model(other)
        paused_total = criterion(logits, y)
    assert torch.equal(paused_total, expected)
    assert paused_total.requires_grad
    lf = feature_loss_reference(prefix(model, "block1")(x)).mean()
    assert torch.allclose(criterion.last["feature_loss"], lf, rtol=1e-6)


def test_the_activation_is_released_after_the_loss_call():
    import gc
    import weakref

    model = tiny_wrn().eval()
    seen = []
    handle = model.block1.register_forward_hook(lambda m, i, o: seen.append(weakref.ref(o)))
    with FeatureSmoothingLoss(model) as criterion, torch.no_grad():
        logits = model(torch.rand(2, 3, 8, 8))
        criterion(logits, torch.tensor([0, 1]))
        del logits
        gc.collect()
        assert seen[-1]() is None
        with criterion.paused():
            model(torch.rand(2, 3, 8, 8))  # not captured: nothing is kept alive
        gc.collect()
        assert seen[-1]() is None
    handle.remove()


def test_data_parallel_over_several_devices_is_refused_with_a_pointer_to_ddp():
    model = tiny_wrn()
    wrapped = torch.nn.DataParallel(model)
    wrapped.device_ids = [0, 1]  # what DataParallel over two GPUs holds (this machine has none)
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        FeatureSmoothingLoss(wrapped)
    # Wrapped after the loss was made: DataParallel runs one replica of the hooked layer per device, from
    # threads (torch.nn.parallel.replicate + parallel_apply, which need GPUs, simulated on CPU: a replica
    # shares its original's hooks).
    criterion = FeatureSmoothingLoss(model)
    outputs = []

    def run_replica():
        replica = model._replicate_for_data_parallel()
        replica.block1 = model.block1._replicate_for_data_parallel()
        outputs.append(replica(torch.rand(1, 3, 8, 8)))

    threads = [threading.Thread(target=run_replica) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(outputs) == 2
    with pytest.raises(RuntimeError, match="DistributedDataParallel"):
        criterion(torch.cat(outputs), torch.tensor([0, 1]))
    # The refusal consumed the replicas' runs: a plain forward afterwards works.
    assert torch.isfinite(criterion(model(torch.rand(2, 3, 8, 8)), torch.tensor([0, 1])))
