"""The per-channel affine kernel (``fsmooth.kernels.channel_affine``, interpreted on CPU) against a float64
reference, and its use by the bf16 prefix copy's affine BatchNorms."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fsmooth.defense import prefix_state as ps
from fsmooth.defense.prefix_state import PrefixState, _make_affine, runs_affine

from test_defense import tiny_wrn, varied_inputs
from test_prefix_state import _features_and_input_grad, _randomize_batchnorms

channel_affine = pytest.importorskip("fsmooth.kernels.channel_affine")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _channels_last(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 0.5
    x = x.to(DEVICE, dtype)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _params(c, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    scale = (torch.rand(c, generator=g, dtype=torch.float64) * 2 - 0.5).to(DEVICE, dtype)
    shift = (torch.randn(c, generator=g, dtype=torch.float64)).to(DEVICE, dtype)
    return scale, shift


def _reference(x, scale, shift):
    """float64 ``x * scale + shift`` per channel (dim 1)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    out = x.double() * scale.double().view(shape)
    return out + shift.double().view(shape) if shift is not None else out


# Odd shapes, batch 1, one channel, more channels than one block holds (300 > 256), 2-D (N, C).
@pytest.mark.parametrize("shape", [(1, 160, 4, 4), (3, 37, 5, 7), (2, 1, 3, 5), (1, 300, 2, 3), (5, 19)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_shift", [True, False])
def test_kernel_matches_the_float64_reference(interpret_triton, shape, dtype, with_shift):
    x = _channels_last(shape, dtype, seed=sum(shape))
    scale, shift = _params(shape[1], dtype, seed=7)
    y = channel_affine.channel_affine(x, scale, shift if with_shift else None)
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()
    ref = _reference(x, scale, shift if with_shift else None)
    # One rounding to the storage dtype at the end: within half an ulp of it, plus fp32's own rounding.
    tol = {torch.float32: 1e-6, torch.bfloat16: 2 ** -8}[dtype]
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)


def test_kernel_matches_addcmul_in_bf16_to_the_last_bit_almost_everywhere(interpret_triton):
    """The same arithmetic as the addcmul it replaces (fp32, one rounding): no change in the defense's
    results beyond what fp32's fused multiply-add could flip in bf16's last bit."""
    x = _channels_last((4, 24, 6, 5), torch.bfloat16, seed=11)
    scale, shift = _params(24, torch.bfloat16, seed=12)
    y = channel_affine.channel_affine(x, scale, shift)
    shape = (1, -1, 1, 1)
    expected = torch.addcmul(shift.view(shape), x, scale.view(shape))
    mismatch = (y != expected).float().mean().item()
    assert mismatch <= 0.01, mismatch
    torch.testing.assert_close(y, expected, rtol=2 ** -7, atol=2 ** -7)


def test_bf16_rounding_is_to_nearest_even_and_keeps_inf_and_nan(interpret_triton):
    """The kernel's own fp32 -> bf16 rounding (the interpreter would truncate) against torch's cast of the
    same fp32 result, on values that cross many rounding boundaries, ties included, and on inf and NaN."""
    g = torch.Generator().manual_seed(26)
    x = (torch.randn(1, 64, 8, 8, generator=g) * 4).to(torch.bfloat16)
    x[0, 0, 0, :4] = torch.tensor([float("inf"), -float("inf"), float("nan"), 3.0e38])  # the last: bf16's top
    x = x.to(DEVICE).contiguous(memory_format=torch.channels_last)
    scale = (1 + torch.arange(64) * 2 ** -9).to(DEVICE, torch.float32)  # products land between bf16 values
    shift = torch.zeros(64, device=DEVICE)
    y = channel_affine.channel_affine(x, scale, shift)
    expected = (x.float() * scale.view(1, -1, 1, 1)).to(torch.bfloat16)
    torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)
    assert torch.isposinf(y[0, 0, 0, 0]) and torch.isneginf(y[0, 0, 0, 1]) and torch.isnan(y[0, 0, 0, 2])
    assert (y != x.float().to(torch.bfloat16)).any()  # the scales did move values across bf16 boundaries


def test_function_gradient_is_the_scale_in_the_gradient_layout(interpret_triton):
    x = _channels_last((2, 21, 3, 4), torch.float32, seed=13).requires_grad_()
    scale, shift = _params(21, torch.float32, seed=14)
    g = _channels_last((2, 21, 3, 4), torch.float32, seed=15)
    y = channel_affine.channel_affine_function(x, scale, shift)
    (grad,) = torch.autograd.grad(y, x, g)
    assert grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(grad.double(), _reference(g, scale, None), rtol=1e-6, atol=1e-6)
    # A gradient in another layout (NCHW) takes ATen's product: the same values.
    y = channel_affine.channel_affine_function(x, scale, shift)
    (grad,) = torch.autograd.grad(y, x, g.contiguous())
    torch.testing.assert_close(grad.double(), _reference(g, scale, None), rtol=1e-6, atol=1e-6)


def test_kernel_rejects_what_it_cannot_read_and_keeps_an_empty_batch(interpret_triton):
    scale, shift = _params(6, torch.float32, seed=16)
    nchw = torch.rand(2, 6, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="channels_last"):
        channel_affine.channel_affine(nchw, scale, shift)
    x = nchw.contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="scale"):
        channel_affine.channel_affine(x, scale[:5], shift)
    with pytest.raises(ValueError, match="shift"):
        channel_affine.channel_affine(x, scale, torch.rand(6, 1, device=DEVICE))
    empty = torch.rand(0, 6, 3, 3, device=DEVICE).contiguous(memory_format=torch.channels_last)
    assert channel_affine.channel_affine(empty, scale, shift).shape == (0, 6, 3, 3)


def test_affine_batchnorm_runs_the_kernel_on_channels_last_and_addcmul_otherwise(interpret_triton, monkeypatch):
    calls = []
    real = channel_affine.channel_affine_function
    monkeypatch.setattr(channel_affine, "channel_affine_function",
                        lambda *a: calls.append(a[0].shape) or real(*a))
    source = nn.BatchNorm2d(7).eval()
    _randomize_batchnorms(source, seed=17)
    copy = nn.BatchNorm2d(7).to(torch.bfloat16).eval()
    _make_affine(copy, source, kernel=True)
    x = _channels_last((2, 7, 4, 5), torch.bfloat16, seed=18)
    out = copy(x)
    assert calls == [x.shape]
    torch.testing.assert_close(out.double(), source.double()(x.double()), rtol=2 ** -7, atol=2 ** -6)
    copy(x.contiguous())                                   # NCHW: addcmul
    assert len(calls) == 1
    plain = nn.BatchNorm2d(7).to(torch.bfloat16).eval()
    _make_affine(plain, source)                            # kernel=False (the default): addcmul
    torch.testing.assert_close(plain(x), out, rtol=2 ** -7, atol=2 ** -7)
    assert len(calls) == 1


def test_half_prefix_uses_the_kernel_unless_compiled_or_switched_off(interpret_triton):
    model = tiny_wrn()
    _randomize_batchnorms(model, seed=19)
    t = varied_inputs(2)
    g = torch.randn((2, 16, 8, 9), generator=torch.Generator().manual_seed(20))
    results = {}
    for name, options, kernel in (("kernel", {}, True), ("compiled", {"compile_prefix": "aot_eager"}, False),
                                  ("off", {}, False)):
        state = PrefixState(model, "block1", dtype=torch.bfloat16, **options)
        if name == "off":
            state.affine_kernel = False
        with state.session() as module:
            affine = [m for m in module.modules() if runs_affine(m)]
            assert affine and all(getattr(m, ps._KERNEL) is kernel for m in affine)
            results[name] = _features_and_input_grad(state, module, t, g)
    feats, grad = results["kernel"]
    for other in ("compiled", "off"):
        torch.testing.assert_close(results[other][0], feats, rtol=2 ** -6, atol=2 ** -6)
        torch.testing.assert_close(results[other][1], grad, rtol=2 ** -5, atol=2 ** -8)


def test_affine_kernel_switch_rebuilds_the_copy_and_checks_its_type():
    state = PrefixState(tiny_wrn(), "block1", dtype=torch.bfloat16)
    with state.session() as module:
        assert all(getattr(m, ps._KERNEL) for m in module.modules() if runs_affine(m))
    state.affine_kernel = False
    with state.session() as module:
        assert not any(getattr(m, ps._KERNEL) for m in module.modules() if runs_affine(m))
    with pytest.raises(TypeError, match="affine_kernel"):
        state.affine_kernel = 1


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(64, 160, 32, 32), (3, 37, 5, 7), (1, 16, 32, 32)])
def test_kernel_on_cuda_matches_reference_and_addcmul_and_replays_in_a_graph(shape):
    x = _channels_last(shape, torch.bfloat16, seed=21)
    scale, shift = _params(shape[1], torch.bfloat16, seed=22)
    y = channel_affine.channel_affine(x, scale, shift)
    torch.testing.assert_close(y.double(), _reference(x, scale, shift), rtol=2 ** -8, atol=2 ** -8)
    addcmul = torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1))
    assert (y != addcmul).float().mean().item() <= 0.01
    # Captured once, replayed on new data in the same buffer: what the graph engines do.
    static = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        channel_affine.channel_affine(static, scale, shift)  # warm-up: compiles the kernel outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = channel_affine.channel_affine(static, scale, shift)
    other = _channels_last(shape, torch.bfloat16, seed=23)
    static.copy_(other)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, channel_affine.channel_affine(other, scale, shift), rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("engine", ["graph", "chunked"])
def test_bf16_engines_run_the_kernel_and_match_addcmul(engine, monkeypatch):
    from fsmooth.defense import ActiveDefense, DefenseConfig
    from test_defense import BETA, initial_losses, noise_for

    calls = []
    real = channel_affine.channel_affine_function
    monkeypatch.setattr(channel_affine, "channel_affine_function", lambda *a: calls.append(1) or real(*a))
    model = tiny_wrn().cuda()
    _randomize_batchnorms(model, seed=24)
    x = varied_inputs(13, size=(8, 9)).cuda()
    noise = noise_for(x.cpu(), 0.075, seed=25).cuda()
    delta = float(initial_losses(model, x + noise).quantile(0.3))
    config = DefenseConfig(beta=BETA, delta=delta, max_iters=40)
    results = {}
    for kernel in (False, True):
        defense = ActiveDefense(model, config=config, engine=engine, dtype=torch.bfloat16)
        defense.prefix.affine_kernel = kernel
        results[kernel] = defense(x, return_info=True, noise=noise)
        assert results[kernel].engine == engine
        assert bool(calls) == kernel  # captured into the graphs with the kernel, never without it
    off, on = results[False], results[True]
    assert (on.iterations - off.iterations).abs().max() <= 2
    assert bool(on.converged.all())
    torch.testing.assert_close(on.inputs, off.inputs, rtol=0, atol=0.05)
