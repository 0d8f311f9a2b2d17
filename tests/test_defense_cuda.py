"""CUDA-graph engines against the eager engine on the same noise (GPU only).

fp32 parity needs IEEE fp32 on both sides: cuDNN allows TF32 for convolutions by default, and TF32
rounding, amplified over tens of iterations and different algorithms per batch size, exceeds the
1e-4 tolerances. Every test here runs with TF32 off (``_ieee_fp32``) unless it sets the flags itself.
"""
import warnings

import pytest
import torch

from fsmooth.defense import ActiveDefense, DefendedClassifier, DefenseConfig, DefenseNotConvergedWarning, defend
from fsmooth.defense import while_loop
from fsmooth.defense.capture_flags import tf32_allowed

from test_defense import BETA, initial_losses, noise_for, tiny_wrn, varied_inputs

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _ieee_fp32():
    with tf32_allowed(False):
        yield


def _setup(n=13, size=(8, 9), max_iters=40):
    model = tiny_wrn().cuda()
    x = varied_inputs(n, size=size).cuda()
    noise = noise_for(x.cpu(), 0.075, seed=21).cuda()
    delta = float(initial_losses(model, x + noise).quantile(0.3))
    return model, x, noise, DefenseConfig(beta=BETA, delta=delta, max_iters=max_iters)


def _assert_close_to_eager(result, ref, config, tol):
    assert result.inputs.shape == ref.inputs.shape
    differ = result.iterations != ref.iterations
    if bool(differ.any()):
        # Only samples whose exit test sat within float rounding of delta may stop one step apart.
        near = torch.minimum((result.feature_loss - config.delta).abs(), (ref.feature_loss - config.delta).abs())
        assert bool((near[differ] < 1e-4 * config.delta + 1e-6).all()), (result.iterations, ref.iterations)
        assert int(differ.sum()) <= 1
    same = ~differ
    assert (result.inputs[same] - ref.inputs[same]).abs().max() < tol
    assert (result.feature_loss[same] - ref.feature_loss[same]).abs().max() < tol


@pytest.mark.parametrize("engine", ["graph", "chunked"])
@pytest.mark.parametrize("max_batch, compact", [(16, False), (16, True), (4, True)])
def test_graph_engines_match_eager_fp32(engine, max_batch, compact):
    model, x, noise, config = _setup()
    ref = ActiveDefense(model, config=config, engine="eager")(x, return_info=True, noise=noise)
    assert len(set(ref.iterations.tolist())) > 3
    defense = ActiveDefense(model, config=config, engine=engine, max_batch=max_batch, compact=compact, chunk=4)
    for _ in range(2):  # the second call replays the captured graphs
        result = defense(x, return_info=True, noise=noise)
        assert result.engine == engine and 0 < result.occupancy <= 1
        _assert_close_to_eager(result, ref, config, tol=1e-4)


def test_extension_while_loop_matches_eager(monkeypatch):
    reason = while_loop.extension_while_reason()
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setattr(while_loop, "native_while_available", lambda: False)
    model, x, noise, config = _setup()
    ref = ActiveDefense(model, config=config, engine="eager")(x, return_info=True, noise=noise)
    result = ActiveDefense(model, config=config, engine="graph", max_batch=8)(x, return_info=True, noise=noise)
    _assert_close_to_eager(result, ref, config, tol=1e-4)


@pytest.mark.parametrize("engine", ["graph", "chunked"])
def test_graph_engines_bf16(engine):
    model, x, noise, config = _setup()
    ref = ActiveDefense(model, config=config, engine="eager", dtype=torch.bfloat16)(x, return_info=True, noise=noise)
    result = ActiveDefense(model, config=config, engine=engine, dtype=torch.bfloat16)(x, return_info=True,
                                                                                     noise=noise)
    assert result.inputs.dtype == torch.float32 and result.feature_loss.dtype == torch.float32
    assert (result.iterations - ref.iterations).abs().max() <= 2
    assert bool(result.converged.all())
    assert next(model.parameters()).dtype == torch.float32


def test_auto_engine_and_max_iters_on_cuda():
    model, x, _, config = _setup(n=3)
    with pytest.warns(DefenseNotConvergedWarning):
        result = defend(model, x, beta=BETA, delta=1e-7, max_iters=3, return_info=True)
    assert result.engine in ("graph", "chunked")
    assert result.iterations.tolist() == [3, 3, 3]
    assert all(p.grad is None for p in model.parameters())


def test_weights_change_after_capture_are_seen():
    model, x, noise, config = _setup(n=4)
    defense = ActiveDefense(model, config=config, engine="chunked")
    first = defense(x, return_info=True, noise=noise)
    with torch.no_grad():
        model.conv1.weight.mul_(1.5)  # in place: the captured graph reads the new values
    eager = ActiveDefense(model, config=config, engine="eager")(x, return_info=True, noise=noise)
    second = defense(x, return_info=True, noise=noise)
    _assert_close_to_eager(second, eager, config, tol=1e-4)
    assert (second.inputs - first.inputs).abs().max() > 1e-5


def test_defended_classifier_on_cuda():
    model, x, _, config = _setup(n=4)
    clf = DefendedClassifier(model, config, outer_loops=3, generator=torch.Generator(device="cuda").manual_seed(0))
    xg = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DefenseNotConvergedWarning)
        out = clf(xg)
    out.sum().backward()
    assert out.shape == (4, 10) and xg.grad is not None and clf.last_info.iterations.shape == (12,)


class _DeadGraph:
    """A captured CUDA graph inside a reference cycle: only the cyclic collector frees it."""

    def __init__(self):
        self.me = self
        self.x = torch.ones(8, device="cuda")
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.x.mul_(2)


@pytest.mark.parametrize("engine", ["graph", "chunked"])
def test_a_dead_graph_awaiting_the_collector_does_not_invalidate_a_capture(engine, monkeypatch):
    """On the first GPU run the collector destroyed a dead runner's graph in the middle of a chunked capture
    and invalidated it. Here a dead graph is kept young (no automatic collection until the captures start),
    then the collector is set to run at every allocation of each capture: without ``collector_paused`` it
    would destroy that graph inside the capture."""
    import gc

    from fsmooth.defense.graph import GraphRunner

    model, x, noise, config = _setup(n=4)
    ref = ActiveDefense(model, config=config, engine="eager")(x, return_info=True, noise=noise)
    original = GraphRunner._capture

    def capture(self, module, b):
        gc.set_threshold(1, 1, 1)
        return original(self, module, b)

    monkeypatch.setattr(GraphRunner, "_capture", capture)
    thresholds = gc.get_threshold()
    gc.set_threshold(10**9)
    try:
        _DeadGraph()
        result = ActiveDefense(model, config=config, engine=engine, max_batch=4)(x, return_info=True, noise=noise)
    finally:
        gc.set_threshold(*thresholds)
    assert result.engine == engine
    _assert_close_to_eager(result, ref, config, tol=1e-4)


def test_a_generator_named_cuda_matches_inputs_on_cuda_0():
    model, x, _, config = _setup(n=3)
    defense = ActiveDefense(model, config=config)
    a = defense.draw_noise(x, generator=torch.Generator(device="cuda").manual_seed(5))
    b = defense.draw_noise(x, generator=torch.Generator(device=x.device).manual_seed(5))
    assert x.device.index is not None and torch.equal(a, b)


@pytest.mark.parametrize("engine", ["graph", "chunked"])
def test_runner_cache_follows_tf32_flags(engine):
    """A graph captured with TF32 off is not replayed once TF32 is on (and back): one runner per setting."""
    model, x, noise, config = _setup(n=4)
    defense = ActiveDefense(model, config=config, engine=engine, max_batch=4)
    defense(x, return_info=True, noise=noise)
    (ieee_runner,) = defense._runners.values()
    with tf32_allowed(True):
        assert defense(x, return_info=True, noise=noise).engine == engine
    assert len(defense._runners) == 2
    defense(x, return_info=True, noise=noise)
    assert len(defense._runners) == 2 and ieee_runner in defense._runners.values()


def test_while_loop_trip_cap_stops_a_predicate_that_never_clears():
    """Whatever WHILE implementation this torch gets (native or fsmooth._C), max_trips bounds a launch."""
    reason = while_loop.while_loop_unavailable_reason(torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
    counter = torch.zeros((), dtype=torch.int64, device="cuda")
    pred = torch.ones((), dtype=torch.bool, device="cuda")
    cap = torch.full((), 23, dtype=torch.int64, device="cuda")

    def body():
        counter.add_(1)
        pred.fill_(True)  # the bug: never clears

    loop = while_loop.capture_while_loop(body, lambda: pred.fill_(True), pred, None, cap)
    counter.zero_()
    loop.launch()
    torch.cuda.synchronize()
    assert int(loop.trips) == 23 and int(counter) == 23  # capture records the body, it does not run it


def test_graph_engine_cap_leaves_max_iters_runs_intact():
    """Every sample running to max_iters needs max_iters + 1 trips: the cap must not cut that short."""
    model, x, noise, config = _setup(n=5)
    config = DefenseConfig(beta=BETA, delta=1e-9, max_iters=7)
    with pytest.warns(DefenseNotConvergedWarning):
        result = ActiveDefense(model, config=config, engine="graph", compact=False, max_batch=8)(
            x, return_info=True, noise=noise)
    assert result.iterations.tolist() == [7] * 5


@pytest.mark.parametrize("engine", ["graph", "chunked"])
def test_compiled_prefix_inside_the_graphs_matches_eager(engine):
    """compile_prefix=True: Inductor's kernels for the prefix, captured into the engine's graphs (every bucket
    after one warm-up); fp32 results as the eager engine's."""
    torch._dynamo.reset()
    model, x, noise, config = _setup()
    ref = ActiveDefense(model, config=config, engine="eager")(x, return_info=True, noise=noise)
    defense = ActiveDefense(model, config=config, engine=engine, max_batch=8, compact=True, chunk=4,
                            compile_prefix=True)
    for _ in range(2):
        result = defense(x, return_info=True, noise=noise)
        assert result.engine == engine
        _assert_close_to_eager(result, ref, config, tol=1e-3)
    torch._dynamo.reset()


def test_half_prefix_iteration_copies_no_feature_tensor(monkeypatch):
    """The bf16 channels_last prefix keeps its layout through the backward: no convolution's backward copies a
    gradient to another layout. With the BatchNorms kept (eval BatchNorm's CUDA backward returns NCHW), the
    same count is positive: the check sees such copies when they happen."""
    from pathlib import Path
    from fsmooth.defense.prefix_state import PrefixState
    from fsmooth.models import WideResNet

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    from copy_sources import profile_copies

    model = WideResNet(16, 2).cuda().eval()
    t = varied_inputs(5, size=(16, 16)).cuda()
    counts = {}
    for affine in (False, True):
        prefix = PrefixState(model, "block1", dtype=torch.bfloat16)
        prefix.affine_batchnorms = affine
        copies = profile_copies(prefix, t, backend="triton")
        counts[affine] = [c for c in copies if c["op"] == "aten::copy_" and c["shapes"].startswith("[[5, ")
                          and "convolution_backward" in c["parents"]]
    assert counts[False], "no layout copy seen with the BatchNorms kept: the check cannot see one"
    assert not counts[True], counts[True]
