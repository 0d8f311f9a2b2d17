"""The prefix as the defense loop runs it: the half-precision copy and its eval BatchNorms as affine maps."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fsmooth.defense.prefix_state import PrefixState, _make_affine, runs_affine
from fsmooth.models import prefix as model_prefix

from test_defense import tiny_wrn, varied_inputs


def _randomize_batchnorms(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
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
def test_affine_batchnorm_is_batchnorm_in_eval_mode(cls, shape, affine):
    source = cls(shape[1], affine=affine, eps=1e-3).double().eval()
    _randomize_batchnorms(source, seed=3)
    copy = cls(shape[1], affine=affine, eps=1e-3).double().eval()  # stale statistics: the refresh must win
    x = (torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 2).requires_grad_()
    g = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    expected = source(x)
    (expected_grad,) = torch.autograd.grad(expected, x, g)
    _make_affine(copy, source)
    assert runs_affine(copy) and not runs_affine(source)
    out = copy(x)
    (grad,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


def test_affine_batchnorm_gradient_keeps_the_channels_last_layout():
    bn = nn.BatchNorm2d(6).eval()
    _randomize_batchnorms(bn, seed=6)
    copy = nn.BatchNorm2d(6).to(torch.bfloat16).eval()
    _make_affine(copy, bn)
    x = torch.rand(3, 6, 5, 7, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = copy(x)
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
        batchnorms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
        feats, grad = _features_and_input_grad(state, module, t, g)
    assert len(batchnorms) == 2 and all(runs_affine(m) for m in batchnorms)  # WRN-10-1's block1
    # The model's own modules are untouched (the copy is private).
    assert not any(runs_affine(m) for m in model.modules())
    ref_feats, ref_grad = _fp64_reference(model, t, g)
    assert feats.is_contiguous(memory_format=torch.channels_last)
    assert _rel(feats, ref_feats) < 2e-2
    assert _rel(grad, ref_grad) < 0.1  # bf16 input gradients: a few percent from fp64, with or without the affine maps


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
    assert _rel(grad, ref_grad) < 0.1  # bf16 input gradients: a few percent from fp64, with or without the affine maps


class _ClampedBatchNorm(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x).clamp(max=0.0)


class _Pair(nn.Module):
    """A prefix of its own (no torch.fx): one BatchNorm reached under two names, and a subclassed one."""
    default_layer = "plain"

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.shared = nn.BatchNorm2d(4)
        self.a = nn.Sequential(self.shared, nn.ReLU())
        self.b = nn.Sequential(self.shared)
        self.clamped = _ClampedBatchNorm(4)
        self.plain = nn.BatchNorm2d(4, track_running_stats=False)

    def prefix(self, layer):
        return nn.Sequential(self.conv, self.a, self.b, self.plain, self.clamped)


def test_only_stock_batchnorms_with_running_statistics_run_affine_and_aliases_stay_one_module():
    model = _Pair().eval()
    _randomize_batchnorms(model, seed=11)
    seen = []
    model.shared.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    state = PrefixState(model, "plain", dtype=torch.bfloat16)
    x = torch.rand(2, 3, 6, 5, generator=torch.Generator().manual_seed(12))
    with state.session() as module:
        affine = {name for name, m in module.named_modules() if runs_affine(m)}
        out = state.features(module, x)
    assert affine == {"1.0"}  # the shared one (its alias "2.0" is the same module), not the subclass or "plain"
    with torch.no_grad():
        model.shared.running_mean.add_(0.5)  # the refresh must reach the alias too
    with state.session() as module:
        out = state.features(module, x)
    assert seen == [torch.bfloat16] * 4  # the hook ran on the copy, at both names, in both calls
    with torch.no_grad():
        ref = model.double().prefix("plain")(x.double())
    model.float()
    assert (out <= 0).all()  # the subclass's own forward ran
    assert _rel(out, ref) < 2e-2


class _OneBatchNorm(nn.Module):
    default_layer = "bn"

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def prefix(self, layer):
        return self.bn


def test_a_prefix_that_is_one_batchnorm():
    model = _OneBatchNorm().eval()
    _randomize_batchnorms(model, seed=13)
    state = PrefixState(model, "bn", dtype=torch.bfloat16)
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(14))
    with state.session() as module:
        assert runs_affine(module)
    with torch.no_grad():
        model.bn.running_mean.fill_(0.3)
    with state.session() as module:
        out = state.features(module, x)
    assert _rel(out, model.bn.double()(x.double())) < 2e-2


def test_full_precision_and_fp16_prefixes_keep_their_batchnorms():
    model = tiny_wrn()
    for dtype in (None, torch.float16):
        state = PrefixState(model, "block1", dtype=dtype)
        with state.session() as module:
            assert any(isinstance(m, nn.BatchNorm2d) for m in module.modules())
            assert not any(runs_affine(m) for m in module.modules())


def test_affine_batchnorms_switch_rebuilds_the_copy():
    """The A/B switch of the benchmark (providers ``*-bf16-bn``); changing it after a call drops the copy."""
    model = tiny_wrn()
    state = PrefixState(model, "block1", dtype=torch.bfloat16)
    with state.session() as module:
        assert any(runs_affine(m) for m in module.modules())
    state.affine_batchnorms = False
    with state.session() as module:
        assert not any(runs_affine(m) for m in module.modules())
    with pytest.raises(TypeError, match="affine_batchnorms"):
        state.affine_batchnorms = "no"


def test_compiled_bf16_prefix_runs_the_affine_batchnorms_like_the_eager_one():
    """torch.compile traces the per-instance forward of the copy's BatchNorms (aot_eager: no compiler here)."""
    model = tiny_wrn()
    _randomize_batchnorms(model, seed=15)
    t = varied_inputs(3)
    g = torch.randn((3, 16, 8, 9), generator=torch.Generator().manual_seed(16))
    results = []
    for compile_prefix in (False, "aot_eager"):
        state = PrefixState(model, "block1", dtype=torch.bfloat16, compile_prefix=compile_prefix)
        with state.session() as module:
            assert any(runs_affine(m) for m in module.modules())
            results.append(_features_and_input_grad(state, module, t, g))
    (feats, grad), (compiled_feats, compiled_grad) = results
    torch.testing.assert_close(compiled_feats, feats, rtol=0, atol=0)
    torch.testing.assert_close(compiled_grad, grad, rtol=0, atol=0)


def test_half_copy_of_a_traced_prefix_follows_the_models_root_buffers():
    from test_models import _TrainModeOps
    torch.manual_seed(0)
    model = _TrainModeOps().eval()
    state = PrefixState(model, "feat", torch.bfloat16)
    x = torch.rand(2, 3, 6, 6)
    with state.session() as module:
        state.features(module, x)  # builds the bf16 copy
    model.mu = torch.full((1, 3, 1, 1), -4.0)  # a new normalisation after the copy was made
    with torch.no_grad(), state.session() as module:
        out = state.features(module, x)
        assert out.dtype == torch.bfloat16
        assert _rel(out, model_prefix(model, "feat")(x)) < 0.02
