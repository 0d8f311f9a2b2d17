"""The prefix as the defense loop runs it: the half-precision copy and its eval BatchNorms as affine maps."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fsmooth.defense.prefix_state import EvalBatchNorm, PrefixState
from fsmooth.models import prefix as model_prefix

from test_defense import tiny_wrn, varied_inputs


def _randomize_batchnorms(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(0.3 + 1.5 * torch.rand(c, generator=g))
                if m.weight is not None:
                    m.weight.copy_(0.5 + torch.rand(c, generator=g))
                    m.bias.copy_(torch.rand(c, generator=g) - 0.5)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("cls,shape", [(nn.BatchNorm1d, (1, 5)), (nn.BatchNorm1d, (3, 5, 7)),
                                       (nn.BatchNorm2d, (2, 5, 3, 4)), (nn.BatchNorm3d, (1, 5, 2, 3, 3))])
@pytest.mark.parametrize("affine", [True, False])
def test_eval_batchnorm_is_batchnorm_in_eval_mode(cls, shape, affine):
    bn = cls(shape[1], affine=affine, eps=1e-3).double().eval()
    _randomize_batchnorms(bn, seed=3)
    x = (torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 2).requires_grad_()
    g = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    expected = bn(x)
    (expected_grad,) = torch.autograd.grad(expected, x, g)
    affine_map = EvalBatchNorm(bn, torch.float64)
    out = affine_map(x)
    (grad,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


def test_eval_batchnorm_gradient_keeps_the_channels_last_layout():
    bn = nn.BatchNorm2d(6).eval()
    _randomize_batchnorms(bn, seed=6)
    affine_map = EvalBatchNorm(bn, torch.bfloat16).to(memory_format=torch.channels_last)
    x = torch.rand(3, 6, 5, 7, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = affine_map(x)
    (grad,) = torch.autograd.grad(out, x, torch.rand_like(out))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert grad.is_contiguous(memory_format=torch.channels_last) and not grad.is_contiguous()


def _features_and_input_grad(prefix_state, module, t, g):
    leaf = t.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        feats = prefix_state.features(module, leaf)
        (grad,) = torch.autograd.grad(feats, leaf, g.to(feats.dtype))
    return feats.detach(), grad


def _fp64_reference(model, t, g):
    ref = model_prefix(model.double(), "block1")
    leaf = t.double().requires_grad_(True)
    feats = ref(leaf)
    (grad,) = torch.autograd.grad(feats, leaf, g.double())
    model.float()
    return feats.detach(), grad


def test_half_prefix_runs_its_batchnorms_as_affine_maps_and_matches_fp64():
    model = tiny_wrn()
    _randomize_batchnorms(model, seed=7)
    state = PrefixState(model, "block1", dtype=torch.bfloat16)
    t = varied_inputs(3, size=(11, 9))
    g = torch.randn((3, 16, 11, 9), generator=torch.Generator().manual_seed(8))
    with state.session() as module:
        kinds = [type(m) for m in module.modules()]
        feats, grad = _features_and_input_grad(state, module, t, g)
    assert EvalBatchNorm in kinds and not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)
    # The model's own modules are untouched: its BatchNorms stay (the copy is private).
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 7
    ref_feats, ref_grad = _fp64_reference(model, t, g)
    assert feats.is_contiguous(memory_format=torch.channels_last)
    assert _rel(feats, ref_feats) < 2e-2
    assert _rel(grad, ref_grad) < 0.1  # bf16 input gradients: 4-7% here, with or without the affine maps


def test_half_prefix_follows_batchnorm_changes_between_calls_in_place():
    model = tiny_wrn()
    state = PrefixState(model, "block1", dtype=torch.bfloat16)
    t = varied_inputs(2)
    g = torch.randn((2, 16, 8, 9), generator=torch.Generator().manual_seed(9))
    with state.session() as module:
        before, _ = _features_and_input_grad(state, module, t, g)
        addresses = [b.data_ptr() for b in module.buffers()]
    _randomize_batchnorms(model, seed=10)  # as training would
    with state.session() as module2:
        after, grad = _features_and_input_grad(state, module2, t, g)
        assert module2 is module and [b.data_ptr() for b in module2.buffers()] == addresses
    ref_feats, ref_grad = _fp64_reference(model, t, g)
    assert _rel(before, ref_feats) > 0.1  # the change matters...
    assert _rel(after, ref_feats) < 2e-2  # ...and the copy sees it
    assert _rel(grad, ref_grad) < 0.1  # bf16 input gradients: 4-7% here, with or without the affine maps


def test_batchnorms_without_running_statistics_stay_batchnorms():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                          nn.BatchNorm2d(4))
    model.default_layer = "3"
    state = PrefixState(model, "3", dtype=torch.bfloat16)
    with state.session() as module:
        kinds = {name: type(m) for name, m in module.named_modules()}
    assert kinds["1"] is nn.BatchNorm2d and kinds["3"] is EvalBatchNorm


def test_full_precision_prefix_keeps_the_models_own_modules():
    model = tiny_wrn()
    state = PrefixState(model, "block1")
    with state.session() as module:
        assert any(isinstance(m, nn.BatchNorm2d) for m in module.modules())
        assert not any(isinstance(m, EvalBatchNorm) for m in module.modules())


def test_affine_batchnorms_can_be_turned_off_before_the_first_call():
    """The A/B switch of the benchmark (providers ``*-bf16-bn``): the copy keeps its BatchNorms."""
    model = tiny_wrn()
    state = PrefixState(model, "block1", dtype=torch.bfloat16)
    state.affine_batchnorms = False
    with state.session() as module:
        assert any(isinstance(m, nn.BatchNorm2d) for m in module.modules())
        assert not any(isinstance(m, EvalBatchNorm) for m in module.modules())
