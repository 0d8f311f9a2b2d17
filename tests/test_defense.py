"""Active Defense semantics on CPU (eager engine) against a literal transcription of Algorithm 1."""
import warnings

import pytest
import torch
from torch import nn

import fsmooth
from fsmooth.defense import (DEFENSE_PRESETS, ActiveDefense, DefenseConfig, DefenseNotConvergedWarning,
                             DefenseResult, defend)
from fsmooth.models import WideResNet
from fsmooth.reference import feature_loss_reference

BETA = 3.0  # tiny 8x8 inputs have large input gradients: the paper's beta=80 would overshoot


def tiny_wrn(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = WideResNet(10, 1)
    # Non-trivial eval-mode BatchNorm statistics.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.to(dtype).eval()


def varied_inputs(b, dtype=torch.float32, seed=1, size=(8, 9)):
    """Inputs with different contrast per sample, so their initial L_F (and iteration counts) differ."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.15, 1.0, b, dtype=torch.float64).view(-1, 1, 1, 1)
    x = 0.5 + (torch.rand((b, 3) + size, generator=g, dtype=torch.float64) - 0.5) * scale
    return x.to(dtype)


def initial_losses(model, t):
    with torch.no_grad():
        return feature_loss_reference(model.prefix()(t)).double()


def algorithm1(model, x1, noise1, beta, delta, max_iters, clamp=None):
    """Literal one-sample Algorithm 1: plain autograd, no batching, no fused kernels."""
    prefix = model.prefix()
    t = x1.unsqueeze(0) + noise1.unsqueeze(0)
    iterations = 0
    while True:
        t = t.detach().requires_grad_(True)
        f = prefix(t).flatten()
        loss = (f - f.mean()).abs().mean()
        if not (loss.item() > delta and iterations < max_iters):
            return t.detach()[0], iterations, loss.item()
        (grad,) = torch.autograd.grad(loss, t)
        t = t - beta * grad
        if clamp is not None:
            t = t.clamp(*clamp)
        iterations += 1


def noise_for(x, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(x.shape, generator=g, dtype=x.dtype) * 2 - 1) * sigma


@pytest.mark.parametrize("clamp", [None, (0.0, 1.0)])
def test_matches_literal_algorithm1_float64(clamp):
    model = tiny_wrn(torch.float64)
    x = varied_inputs(4, torch.float64)
    noise = noise_for(x, 0.075, seed=2)
    delta = float(initial_losses(model, x + noise).quantile(0.4))
    config = DefenseConfig(beta=BETA, delta=delta, max_iters=40, clamp=clamp)
    result = ActiveDefense(model, config=config, engine="eager")(x, return_info=True, noise=noise)
    assert isinstance(result, DefenseResult) and result.engine == "eager"
    assert result.inputs.dtype == torch.float64 and result.inputs.shape == x.shape
    for i in range(x.shape[0]):
        t_ref, it_ref, loss_ref = algorithm1(model, x[i], noise[i], BETA, delta, 40, clamp)
        assert int(result.iterations[i]) == it_ref
        err = (result.inputs[i] - t_ref).norm() / t_ref.norm()
        assert err < 1e-10
        assert abs(float(result.feature_loss[i]) - loss_ref) < 1e-6
    # Early exit happened for some samples and not for others, and all converged below delta.
    assert int(result.iterations.min()) == 0 and int(result.iterations.max()) > 2
    assert bool(result.converged.all()) and bool((result.feature_loss <= delta).all())
    if clamp is not None:
        moved = result.iterations > 0
        assert float(result.inputs[moved].min()) >= 0.0 and float(result.inputs[moved].max()) <= 1.0


def test_max_iters_cap_warns_once():
    model = tiny_wrn()
    x = varied_inputs(3)
    with pytest.warns(DefenseNotConvergedWarning, match="3 of 3 samples reached max_iters=4") as record:
        result = defend(model, x, beta=BETA, delta=1e-6, max_iters=4, return_info=True,
                        generator=torch.Generator().manual_seed(0))
    assert len([w for w in record if issubclass(w.category, DefenseNotConvergedWarning)]) == 1
    assert result.iterations.tolist() == [4, 4, 4]
    assert not bool(result.converged.any())
    assert bool((result.feature_loss > 1e-6).all())


def test_batch_invariance_fp32():
    model = tiny_wrn()
    x = varied_inputs(5)
    noise = noise_for(x, 0.075, seed=3)
    delta = float(initial_losses(model, x + noise).quantile(0.3))
    defense = ActiveDefense(model, config=DefenseConfig(beta=BETA, delta=delta, max_iters=30), engine="eager")
    full = defense(x, return_info=True, noise=noise)
    assert len(set(full.iterations.tolist())) > 2
    for i in range(x.shape[0]):
        one = defense(x[i:i + 1], return_info=True, noise=noise[i:i + 1])
        assert one.iterations.item() == full.iterations[i].item()
        assert (one.inputs[0] - full.inputs[i]).abs().max() < 1e-5
    # A permuted batch gives the same per-sample results.
    perm = torch.tensor([3, 0, 4, 2, 1])
    shuffled = defense(x[perm], return_info=True, noise=noise[perm])
    assert shuffled.iterations.tolist() == full.iterations[perm].tolist()
    assert (shuffled.inputs - full.inputs[perm]).abs().max() < 1e-5


def test_generator_determinism():
    model = tiny_wrn()
    x = varied_inputs(3)
    kw = dict(beta=BETA, delta=0.3, max_iters=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DefenseNotConvergedWarning)
        a = defend(model, x, generator=torch.Generator().manual_seed(7), **kw)
        b = defend(model, x, generator=torch.Generator().manual_seed(7), **kw)
        c = defend(model, x, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-4


def test_noise_is_the_generators_exact_symmetric_draw():
    """``t0 - x`` is exactly ``(2u - 1) sigma`` for ``u = rand(x.shape, generator)``: U(-sigma, sigma), per element."""
    model = tiny_wrn(torch.float64)
    x = varied_inputs(4, torch.float64)
    sigma = 0.05
    # delta above every L_F: no update, so the defended input is x plus the noise alone.
    n = defend(model, x, sigma=sigma, beta=BETA, delta=100.0, generator=torch.Generator().manual_seed(7)) - x
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert (n - (2 * u - 1) * sigma).abs().max() < 1e-15
    assert float(n.abs().max()) <= sigma
    for i in range(x.shape[0]):  # both signs, out to +-sigma, in every sample
        assert float(n[i].max()) > 0.95 * sigma and float(n[i].min()) < -0.95 * sigma
        assert abs(float(n[i].mean())) < 0.1 * sigma
    # Independent across samples: no sample's noise repeats or correlates with another's (216 values each).
    correlation = torch.corrcoef(n.flatten(1)) - torch.eye(x.shape[0], dtype=torch.float64)
    assert float(correlation.abs().max()) < 0.3


def test_no_grad_and_inference_mode_callers():
    model = tiny_wrn()
    x = varied_inputs(2)
    noise = noise_for(x, 0.075, seed=4)
    defense = ActiveDefense(model, config=DefenseConfig(beta=BETA, delta=0.2, max_iters=6), engine="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DefenseNotConvergedWarning)
        ref = defense(x, noise=noise)
        with torch.no_grad():
            under_no_grad = defense(x, noise=noise)
        with torch.inference_mode():
            under_inference = defense(x, noise=noise)
    assert (ref - x - noise).abs().max() > 1e-4  # it really iterated
    assert torch.equal(ref, under_no_grad) and torch.equal(ref, under_inference)
    assert not ref.requires_grad


def test_inference_mode_model_gives_clear_error():
    with torch.inference_mode():
        model = tiny_wrn()
        x = varied_inputs(1)
    with pytest.raises(RuntimeError, match="inference"):
        defend(model, x, beta=BETA, delta=0.01, max_iters=2)


def test_weights_modes_and_flags_restored():
    model = tiny_wrn()
    model.train()
    model.block1[0].bn1.eval()  # a mixed-mode model
    model.conv1.weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DefenseNotConvergedWarning)
        out = defend(model, varied_inputs(3), beta=BETA, delta=0.05, max_iters=3)
    assert out.shape == (3, 3, 8, 9)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # includes BN running statistics: the prefix ran in eval mode
    assert all(p.grad is None for p in model.parameters())
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


def test_empty_batch():
    model = tiny_wrn()
    x = torch.rand(0, 3, 8, 8)
    result = defend(model, x, return_info=True)
    assert result.inputs.shape == x.shape and result.iterations.shape == (0,)
    assert result.converged.shape == (0,) and result.feature_loss.dtype == torch.float32
    assert defend(model, x).shape == x.shape


@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(x=[[1.0]]), TypeError, "x"),
    (dict(x=torch.zeros(2, 3, 8, 8, dtype=torch.int64)), TypeError, "x"),
    (dict(x=torch.rand(3, 8, 8)), ValueError, "x"),
    (dict(x=torch.rand(2, 4, 8, 8)), ValueError, "channels"),
    (dict(x=torch.full((1, 3, 8, 8), float("nan"))), ValueError, "NaN or Inf"),
    (dict(x=torch.full((1, 3, 8, 8), float("inf"))), ValueError, "NaN or Inf"),
    (dict(x=torch.rand(2, 3, 8, 8) * 255), ValueError, r"x must be images with values in \[0, 1\]"),
    (dict(x=torch.rand(2, 3, 8, 8) - 0.5), ValueError, r"x must be images .*got values in \[-0\.4"),
    (dict(return_info="no"), TypeError, "return_info"),
    (dict(sigma=-0.1), ValueError, "sigma"),
    (dict(beta=0.0), ValueError, "beta"),
    (dict(delta=0.0), ValueError, "delta"),
    (dict(delta=-1.0), ValueError, "delta"),
    (dict(max_iters=0), ValueError, "max_iters"),
    (dict(max_iters=2.5), TypeError, "max_iters"),
    (dict(clamp=(1.0, 0.0)), ValueError, "clamp"),
    (dict(engine="fast"), ValueError, "engine"),
    (dict(layer="block9"), ValueError, "block9"),
    (dict(generator=1234), TypeError, "generator"),
])
def test_bad_inputs(kwargs, exc, name):
    model = tiny_wrn()
    x = kwargs.pop("x", torch.rand(2, 3, 8, 8))
    with pytest.raises(exc, match=name):
        defend(model, x, **kwargs)


def test_model_on_another_device():
    model = tiny_wrn().to("meta")
    with pytest.raises(ValueError, match="model is on meta"):
        defend(model, torch.rand(1, 3, 8, 8))


def test_meta_input_is_refused_before_its_values_are_read():
    with pytest.raises(ValueError, match="x is on the meta device"):
        defend(tiny_wrn(), torch.empty(1, 3, 8, 8, device="meta"))
    with pytest.raises(ValueError, match="x is on the meta device"):
        defend(tiny_wrn().to("meta"), torch.empty(1, 3, 8, 8, device="meta"))


def test_defend_cache_follows_replaced_modules_and_dtype_changes():
    import fsmooth.defense.api as api

    model = tiny_wrn()
    x = varied_inputs(3)
    kw = dict(sigma=0.075, beta=BETA, delta=0.05, max_iters=5)
    config = DefenseConfig(**kw)

    def via_defend(inputs):
        return defend(model, inputs, generator=torch.Generator().manual_seed(0), engine="eager", **kw)

    def fresh(inputs):
        return ActiveDefense(model, config=config, engine="eager")(inputs, torch.Generator().manual_seed(0))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # convergence is not the point here
        before = via_defend(x)
        model.block1 = tiny_wrn(seed=5).block1  # other weights in a new module
        replaced = via_defend(x)
        assert torch.equal(replaced, fresh(x)) and not torch.equal(replaced, before)
        model.double()  # new storage in another dtype
        doubled = via_defend(x.double())
        assert doubled.dtype == torch.float64 and torch.equal(doubled, fresh(x.double()))
        # An in-place update (an optimizer step) keeps the engine, and the engine sees the new values.
        engine = api._cached_engine(model, None, "eager", None)
        with torch.no_grad():
            model.conv1.weight.mul_(1.5)
        assert api._cached_engine(model, None, "eager", None) is engine
        stepped = via_defend(x.double())
        assert torch.equal(stepped, fresh(x.double())) and not torch.equal(stepped, doubled)


def test_forced_graph_engine_on_cpu_raises_with_reason(monkeypatch):
    model = tiny_wrn()
    x = torch.rand(1, 3, 8, 8)
    for engine in ("graph", "chunked"):
        with pytest.raises(RuntimeError, match="needs a CUDA device"):
            defend(model, x, engine=engine)
    monkeypatch.setenv("FSMOOTH_ENFORCE_EAGER", "1")
    with pytest.raises(RuntimeError, match="FSMOOTH_ENFORCE_EAGER"):
        defend(model, x, engine="graph")
    assert defend(model, x, delta=100.0, return_info=True).engine == "eager"


def test_presets_and_model_delta():
    assert DefenseConfig.preset("cifar10").delta == 0.0124
    assert DefenseConfig.preset("cifar100").delta == 0.0118
    assert DefenseConfig.preset("cifar10-standard").delta == 0.0562
    assert DefenseConfig.preset("cifar100-standard").delta == 0.0880
    assert DEFENSE_PRESETS["cifar10"] == DefenseConfig()
    assert (DefenseConfig().sigma, DefenseConfig().beta) == (0.075, 80.0)
    assert DefenseConfig.preset("cifar10", max_iters=5).max_iters == 5
    with pytest.raises(ValueError, match="preset"):
        DefenseConfig.preset("imagenet")
    assert fsmooth.DefenseConfig is DefenseConfig
    # delta=None follows the calibrated model attribute.
    model = tiny_wrn()
    x = varied_inputs(2)
    noise = noise_for(x, 0.075, seed=5)
    high = 2 * float(initial_losses(model, x + noise).max())
    model.defense_delta = high
    assert ActiveDefense(model).config.delta == high
    result = defend(model, x, generator=torch.Generator().manual_seed(0), return_info=True)
    assert result.iterations.tolist() == [0, 0]


def test_bfloat16_prefix_keeps_fp32_state():
    model = tiny_wrn()
    x = varied_inputs(3)
    noise = noise_for(x, 0.075, seed=6)
    delta = float(initial_losses(model, x + noise).quantile(0.5))
    config = DefenseConfig(beta=BETA, delta=delta, max_iters=20)
    fp32 = ActiveDefense(model, config=config, engine="eager")(x, return_info=True, noise=noise)
    bf16 = ActiveDefense(model, config=config, engine="eager", dtype=torch.bfloat16)(x, return_info=True, noise=noise)
    assert bf16.inputs.dtype == torch.float32 and bf16.feature_loss.dtype == torch.float32
    assert (bf16.iterations - fp32.iterations).abs().max() <= 2
    assert bool(bf16.converged.all()) and bool((bf16.feature_loss <= delta).all())
    same = bf16.iterations == fp32.iterations
    a, b = bf16.inputs[same], fp32.inputs[same]
    assert bool(same.any()) and (a - b).norm() / b.norm() < 0.01
    assert next(model.parameters()).dtype == torch.float32


def test_generic_model_through_fx():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(6 * 36, 4))
    x = torch.rand(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DefenseNotConvergedWarning)
        result = defend(model, x, layer="2", beta=1.0, delta=1e-3, max_iters=3, return_info=True,
                        generator=torch.Generator().manual_seed(0))
    assert result.iterations.tolist() == [3, 3]
    assert (result.inputs - x).abs().max() > 0.075  # moved beyond the noise


def test_triton_kernel_path_in_interpreter(interpret_triton):
    """The fused Triton loss+gradient (interpreted on CPU) drives the same loop as the reference."""
    model = tiny_wrn()
    x = varied_inputs(2, size=(4, 5))
    noise = noise_for(x, 0.075, seed=9)
    config = DefenseConfig(beta=BETA, delta=1e-4, max_iters=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DefenseNotConvergedWarning)
        fused = ActiveDefense(model, config=config, engine="eager", backend="triton")(x, return_info=True, noise=noise)
        ref = ActiveDefense(model, config=config, engine="eager", backend="reference")(x, return_info=True,
                                                                                     noise=noise)
    assert fused.iterations.tolist() == [2, 2]
    assert (fused.inputs - ref.inputs).abs().max() < 1e-5
    assert (fused.feature_loss - ref.feature_loss).abs().max() < 1e-5


def test_defend_cache_does_not_keep_the_model_alive():
    import gc
    import weakref

    model = tiny_wrn()
    defend(model, varied_inputs(1), delta=100.0)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_auto_engine_falls_back_to_eager_when_a_graph_engine_fails(monkeypatch):
    import fsmooth.defense.api as api

    class Broken:
        def run(self, *args):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(api, "resolve_engine", lambda engine, device, enforce: "chunked")
    monkeypatch.setattr(api.ActiveDefense, "_runner", lambda self, engine, x: Broken())
    model = tiny_wrn()
    x = varied_inputs(2)
    auto = ActiveDefense(model, config=DefenseConfig(delta=100.0))
    with pytest.warns(RuntimeWarning, match="falls back to 'eager'"):
        assert auto(x, return_info=True).engine == "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert auto(x, return_info=True).engine == "eager"  # no second attempt, no second warning
    forced = ActiveDefense(model, config=DefenseConfig(delta=100.0), engine="chunked")
    with pytest.raises(RuntimeError, match="stream is capturing"):
        forced(x)


def test_traced_model_built_in_train_mode_is_defended_in_eval_mode():
    """A prefix traced right after training must not keep the functional dropout and batch statistics
    that ``self.training`` switched on then: with sigma = 0 the defense is deterministic, and equal to the
    defense of the same model traced in eval mode."""
    from test_models import _TrainModeOps
    torch.manual_seed(0)
    model = _TrainModeOps().train()
    reference = _TrainModeOps().eval()
    reference.load_state_dict(model.state_dict())
    x = varied_inputs(3, size=(6, 6))
    config = DefenseConfig(sigma=0.0, beta=1.0, delta=1e-6, max_iters=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DefenseNotConvergedWarning)
        defense = ActiveDefense(model, "feat", config, engine="eager")
        first, second = defense(x), defense(x)
        expected = ActiveDefense(reference, "feat", config, engine="eager")(x)
    assert torch.equal(first, second) and torch.equal(first, expected)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(backend="bogus"), ValueError, "backend"),
    (dict(compact="no"), TypeError, "compact"),
    (dict(progress=1), TypeError, "progress"),
    (dict(enforce_eager="yes"), TypeError, "enforce_eager"),
])
def test_bad_engine_options_are_refused_at_construction(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        ActiveDefense(tiny_wrn(), **kwargs)
