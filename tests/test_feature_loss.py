"""Feature loss: reference vs float64 autograd, Triton kernel (interpreter on CPU) vs reference."""
import zlib

import pytest
import torch

import fsmooth
from fsmooth.functional import feature_loss, feature_loss_and_grad, select_backend
from fsmooth.reference import feature_loss_grad_reference, feature_loss_reference
from fsmooth.kernels import feature_loss as kernel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Odd shapes, batch 1, N not a multiple of the block, and N spanning several chunks (> 8192).
SHAPES = [(1, 3, 5, 7), (3, 5, 7, 9), (2, 7, 13), (1, 3, 61, 47), (5, 1001)]


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def closed_form_loss_grad(x64):
    """An independent float64 transcription of the method's formulas."""
    f = x64.flatten(1)
    n = f.shape[1]
    d = f - f.mean(1, keepdim=True)
    s = torch.sign(d)
    return d.abs().sum(1) / n, ((s - s.mean(1, keepdim=True)) / n).view_as(x64)


def test_reference_matches_float64_autograd():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, dtype=torch.float64)
    (feature_loss_reference(x) * w).sum().backward()
    loss, grad = feature_loss_grad_reference(x.detach())
    ref_loss, ref_grad = closed_form_loss_grad(x.detach())
    assert rel_err(loss, ref_loss) < 1e-12
    assert rel_err(grad, ref_grad) < 1e-12
    assert rel_err(x.grad, ref_grad * w.view(-1, 1, 1, 1)) < 1e-12


def test_reference_gradcheck():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(feature_loss_reference, (x,), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_forward_and_grad_match_reference(shape, dtype):
    torch.manual_seed(zlib.crc32(f"{shape}/{dtype}".encode()))  # fixed: hash() of a str varies per process
    x = (torch.randn(shape, device=DEVICE) * 3 + 0.5).to(dtype)
    ref_loss, ref_grad = closed_form_loss_grad(x.double())
    loss, grad = kernel.feature_loss_and_grad_triton(x)
    assert loss.dtype == torch.float32 and grad.dtype == dtype and grad.shape == x.shape
    assert rel_err(loss, ref_loss) < 1e-5
    # Gradient entries are +-(1 -+ s)/N: exact in fp32, rounded to the storage dtype otherwise.
    assert rel_err(grad, ref_grad) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (1, 3, 61, 47)])
def test_kernel_autograd_backward_scales_by_upstream(shape):
    torch.manual_seed(2)
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    upstream = torch.rand(shape[0], device=DEVICE) + 0.5
    loss = kernel.feature_loss_triton(x)
    (loss * upstream).sum().backward()
    _, ref_grad = closed_form_loss_grad(x.detach().double())
    assert rel_err(x.grad, ref_grad * upstream.double().view(-1, 1, 1, 1)) < 1e-6


def test_kernel_channels_last_keeps_layout():
    torch.manual_seed(3)
    x = torch.randn(3, 6, 5, 7, device=DEVICE).to(memory_format=torch.channels_last)
    loss, grad = kernel.feature_loss_and_grad_triton(x)
    assert grad.is_contiguous(memory_format=torch.channels_last)
    ref_loss, ref_grad = closed_form_loss_grad(x.double())
    assert rel_err(loss, ref_loss) < 1e-6 and rel_err(grad, ref_grad) < 1e-6


def test_kernel_writes_every_output_element():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 61, 47, device=DEVICE)
    loss, sign_mean, signs = kernel.feature_loss_forward(x, need_grad=True)
    poisoned = torch.full_like(x, float("nan"))
    out = kernel.feature_loss_backward(signs, sign_mean, torch.ones_like(loss), x, out=poisoned)
    assert out.data_ptr() == poisoned.data_ptr()
    assert torch.isfinite(out).all()
    assert rel_err(out, closed_form_loss_grad(x.double())[1]) < 1e-6


def test_kernel_is_batch_invariant():
    torch.manual_seed(5)
    x = torch.randn(4, 3, 11, 13, device=DEVICE)
    loss, grad = kernel.feature_loss_and_grad_triton(x)
    for i in range(4):
        li, gi = kernel.feature_loss_and_grad_triton(x[i:i + 1])
        assert torch.equal(li, loss[i:i + 1]) and torch.equal(gi, grad[i:i + 1])


def test_constant_features_give_zero_loss_and_gradient():
    x = torch.full((2, 4, 5, 5), 0.37, device=DEVICE)
    for loss, grad in (kernel.feature_loss_and_grad_triton(x), feature_loss_grad_reference(x)):
        assert loss.abs().max().item() < 1e-6
        assert torch.equal(grad, torch.zeros_like(x))


def test_grad_scale_is_folded_in():
    torch.manual_seed(6)
    x = torch.randn(3, 2, 5, 5, device=DEVICE)
    scale = torch.tensor([1.0, 0.0, 2.5], device=DEVICE)
    _, ref_grad = closed_form_loss_grad(x.double())
    for backend in ("triton", "reference"):
        if backend == "triton":
            _, grad = kernel.feature_loss_and_grad_triton(x, scale)
        else:
            _, grad = feature_loss_and_grad(x, scale, backend="reference")
        assert rel_err(grad, ref_grad * scale.double().view(-1, 1, 1, 1)) < 1e-6
        assert torch.equal(grad[1], torch.zeros_like(grad[1]))


def test_reference_path_scales_half_precision_before_rounding_and_keeps_the_layout():
    """At N = 32,768 the unscaled gradient (sign - mean sign) / N is an fp16 subnormal: scaling it after
    rounding (by beta = 80) multiplied the rounding error; now it is rounded once, like the Triton kernel."""
    torch.manual_seed(8)
    x = torch.randn(2, 32, 32, 32).half()
    scale = torch.tensor([80.0, 3.0])
    _, grad = feature_loss_and_grad(x, scale, backend="reference")
    _, ref = closed_form_loss_grad(x.double())
    expected = ref * scale.double().view(-1, 1, 1, 1)
    assert grad.dtype == torch.float16
    assert (grad.double() - expected).abs().max() <= (expected.half().double() - expected).abs().max()
    y = torch.randn(2, 5, 3, 4).to(memory_format=torch.channels_last)
    loss, grad = feature_loss_and_grad(y, backend="reference")
    assert grad.is_contiguous(memory_format=torch.channels_last) and grad.dtype == y.dtype
    torch.testing.assert_close(grad.double(), closed_form_loss_grad(y.double())[1], rtol=1e-6, atol=1e-9)


def test_auto_backend_dispatch(interpret_triton):
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    assert select_backend(x) == "triton"
    assert select_backend(x.double()) == "reference"  # the kernel takes fp32/fp16/bf16 only
    assert select_backend(x, "reference") == "reference"
    assert rel_err(feature_loss(x), closed_form_loss_grad(x.double())[0]) < 1e-6


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU dispatch only")
def test_cpu_auto_uses_reference_without_interpret_env(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 3, 4, 4)
    assert select_backend(x) == "reference"
    assert select_backend(x, "triton") == "triton"  # the explicit option runs the interpreted kernel


def test_triton_backend_unavailable_raises_with_reason(monkeypatch):
    import triton
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        select_backend(torch.randn(2, 3), "triton")


def test_auto_backend_warns_once_when_a_cuda_tensor_falls_back(monkeypatch):
    """CUDA features the kernel supports fall back to the reference only when the kernels cannot be imported:
    that is a setup problem, said once per reason (a stand-in tensor: the dispatch reads device and dtype)."""
    import types
    import warnings

    from fsmooth import functional

    reason = "ModuleNotFoundError: No module named 'fsmooth.kernels' (test)"
    monkeypatch.setattr(functional, "_triton_kernels", lambda: (None, reason))
    functional._warn_cuda_fallback.cache_clear()
    cuda_bf16 = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)
    cuda_fp64 = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_backend(cuda_fp64) == "reference"  # fp64: the kernel's dtype limit, not a problem
    with pytest.warns(RuntimeWarning, match="No module named 'fsmooth.kernels'"):
        assert select_backend(cuda_bf16) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_backend(cuda_bf16) == "reference"  # once per reason
    functional._warn_cuda_fallback.cache_clear()


def test_reductions_and_top_level_name():
    torch.manual_seed(7)
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    per_sample = fsmooth.feature_loss(x)
    assert per_sample.shape == (3,) and per_sample.dtype == torch.float64
    assert torch.allclose(feature_loss(x, "mean"), per_sample.mean())
    assert torch.allclose(feature_loss(x, "sum"), per_sample.sum())


def test_empty_batch_gives_empty_result():
    x = torch.randn(0, 3, 4, 4)
    assert feature_loss(x).shape == (0,)
    loss, grad = feature_loss_and_grad(x)
    assert loss.shape == (0,) and grad.shape == x.shape


@pytest.mark.parametrize("bad, error, match", [
    (torch.randn(5), ValueError, "features"),
    (torch.ones(2, 3, dtype=torch.int64), TypeError, "features"),
    ([[1.0, 2.0]], TypeError, "features"),
    (torch.randn(2, 0), ValueError, "features"),
])
def test_bad_inputs_name_the_argument(bad, error, match):
    with pytest.raises(error, match=match):
        feature_loss(bad)
    with pytest.raises(error, match=match):
        feature_loss_and_grad(bad)


def test_bad_options_name_the_argument():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="reduction"):
        feature_loss(x, reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        feature_loss(x, backend="cuda")
    with pytest.raises(ValueError, match="grad_scale"):
        feature_loss_and_grad(x, torch.ones(3))
    with pytest.raises(TypeError, match="grad_scale"):
        feature_loss_and_grad(x, [1.0, 1.0])
    with pytest.raises(TypeError, match="grad_scale"):
        feature_loss_and_grad(x, torch.ones(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="grad_scale.*device"):
        feature_loss_and_grad(x, torch.ones(2, device="meta"))


@pytest.mark.slow
def test_kernel_large_sample_many_chunks():
    # N = 2^21 + 3: 257 chunks per sample, a ragged last block (about 12 s in the interpreter).
    torch.manual_seed(8)
    x = torch.randn(1, 2**21 + 3, device=DEVICE)
    loss, grad = kernel.feature_loss_and_grad_triton(x)
    ref_loss, ref_grad = closed_form_loss_grad(x.double())
    assert rel_err(loss, ref_loss) < 1e-6 and rel_err(grad, ref_grad) < 1e-6


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_on_gpu_at_wrn_shape(dtype):
    torch.manual_seed(9)
    x = torch.randn(256, 160, 32, 32, device="cuda").to(dtype)
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=layout)
        loss, grad = kernel.feature_loss_and_grad_triton(xl)
        ref_loss, ref_grad = closed_form_loss_grad(xl.double())
        assert rel_err(loss, ref_loss) < 1e-5
        assert rel_err(grad, ref_grad) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.cuda
def test_kernel_int64_offsets_on_gpu():
    # B * N > 2^31 elements: offsets overflow int32.
    n = 2**21 + 5
    b = (2**31) // n + 2
    x = torch.randn(b, n, device="cuda", dtype=torch.bfloat16)
    loss, grad = kernel.feature_loss_and_grad_triton(x)
    last = x[-1:].double()
    ref_loss, ref_grad = closed_form_loss_grad(last)
    assert rel_err(loss[-1:], ref_loss) < 1e-5
    assert rel_err(grad[-1:], ref_grad) < 1e-2


def test_kernels_launch_under_the_tensors_cuda_device(monkeypatch):
    """Triton launches on the current CUDA device: the wrappers enter the tensors' own device first (a
    tensor on cuda:1 while cuda:0 is current). Checked without a GPU: the guard is built, not entered."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    guard = kernel.on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(kernel.on_device(torch.device("cuda", 0)), torch.cuda.device)
    with kernel.on_device(torch.device("cpu")):  # nothing to switch on the CPU (the interpreter)
        pass
