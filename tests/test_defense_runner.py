"""Host-side logic of the CUDA-graph runner (slots, continuous batching, compaction) on CPU.

The captured graphs are replaced by eager replays of the very same iteration
function, so everything except the capture itself runs here: a sample's
result and iteration count must match the eager engine whatever slot and
bucket it went through.
"""
import pytest
import torch

from fsmooth.defense import ActiveDefense, DefenseConfig
from fsmooth.defense.graph import GraphRunner, bucket_sizes

from test_defense import BETA, initial_losses, noise_for, tiny_wrn, varied_inputs


class _ReplayedGraph:
    """Stands in for a captured graph: the same iteration, run eagerly."""

    def __init__(self, runner, module, b):
        self.runner, self.module, self.b = runner, module, b
        self.launches = 0

    def _step(self):
        self.runner._iteration(self.module, self.b)

    def replay(self):  # chunked
        self.launches += 1
        for _ in range(self.runner.chunk):
            self._step()

    def launch(self):  # WHILE node: condition first, then iterate while it holds
        self.launches += 1
        self.runner._update_predicate(self.b)
        while bool(self.runner.pred):
            self._step()


class CpuRunner(GraphRunner):
    @staticmethod
    def _check_device(device):
        pass

    def _capture_buckets(self, module, sizes):
        for size in sizes:
            self._warm_up(module, size)
            self._graphs[size] = _ReplayedGraph(self, module, size)


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert bucket_sizes(12) == [1, 2, 4, 8, 12]


@pytest.mark.parametrize("mode, max_batch, compact", [
    ("graph", 4, True),     # 11 samples through 4 slots: continuous batching, then compaction
    ("chunked", 4, True),
    ("graph", 16, False),   # everything fits: one launch
    ("chunked", 3, False),  # non-power-of-two bucket
])
def test_runner_matches_eager(mode, max_batch, compact):
    model = tiny_wrn()
    x = varied_inputs(11)
    noise = noise_for(x, 0.075, seed=12)
    delta = float(initial_losses(model, x + noise).quantile(0.3))
    config = DefenseConfig(beta=BETA, delta=delta, max_iters=25)
    defense = ActiveDefense(model, config=config, engine="eager")
    ref = defense(x, return_info=True, noise=noise)
    assert len(set(ref.iterations.tolist())) > 3

    runner = CpuRunner(defense.prefix, x.device, tuple(x.shape[1:]), mode=mode, max_batch=max_batch, chunk=2, progress=(mode == "graph"),
                       compact=compact)
    with torch.no_grad(), defense.prefix.session() as module:
        t, iterations, loss, grew, occupancy = runner.run(module, x + noise, config)
    assert iterations.tolist() == ref.iterations.tolist()
    assert not grew.any() and not ref.diverged.any()
    assert (t - ref.inputs).abs().max() < 1e-5
    assert (loss - ref.feature_loss).abs().max() < 1e-5
    assert 0 < occupancy <= 1
    if mode == "graph" and not compact:
        assert runner._graphs[16].launches == 1  # the whole call was one launch
    if compact:
        used = [b for b, g in runner._graphs.items() if g.launches]
        assert min(used) < max_batch  # the tail ran in a smaller bucket


def test_runner_reuse_and_max_iters():
    model = tiny_wrn()
    defense = ActiveDefense(model, config=DefenseConfig(beta=BETA, delta=1e-6, max_iters=3), engine="eager")
    runner = CpuRunner(defense.prefix, torch.device("cpu"), (3, 8, 9), mode="graph", max_batch=2)
    for n in (5, 1):
        x = varied_inputs(n)
        with torch.no_grad(), defense.prefix.session() as module:
            t, iterations, loss, _, _ = runner.run(module, x, defense.config)
        assert iterations.tolist() == [3] * n
        assert bool((loss > 1e-6).all()) and (t - x).abs().max() > 1e-4


class _Cycle:
    """A dead reference cycle: only the cyclic collector frees it (as a runner and its WHILE loop's closure)."""

    freed = 0

    def __init__(self):
        self.me = self

    def __del__(self):
        type(self).freed += 1


@pytest.mark.parametrize("enabled", [True, False])
def test_collector_paused_collects_first_then_keeps_the_collector_off(enabled):
    import gc

    from fsmooth.defense.while_loop import collector_paused

    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        _Cycle.freed = 0
        _Cycle()
        with collector_paused():
            assert _Cycle.freed == 1  # freed before any capture starts, not in the middle of one
            assert not gc.isenabled()
        assert gc.isenabled() is enabled
        with pytest.raises(RuntimeError, match="capture failed"):
            with collector_paused():
                raise RuntimeError("capture failed")
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


def test_indexed_device_fills_in_the_current_index(monkeypatch):
    from fsmooth.defense.prefix_state import indexed_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert indexed_device("cuda") == torch.device("cuda:1")
    assert indexed_device(torch.device("cuda:0")) == torch.device("cuda:0")
    assert indexed_device("cpu") == torch.device("cpu")
    assert indexed_device("mps") == torch.device("mps:0")  # torch.mps has no current_device


class _Stream:
    def wait_stream(self, other):
        pass


class _DeviceUncheckedRunner(GraphRunner):
    """GraphRunner with its real capture code on CPU (with ``cuda_stream_stubs``)."""

    @staticmethod
    def _check_device(device):
        pass


@pytest.fixture
def cuda_stream_stubs(monkeypatch):
    """The CUDA stream calls of GraphRunner._capture_buckets, as no-ops: its real code runs on CPU."""
    import contextlib

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)


def _small_problem(n=6, max_iters=5):
    model = tiny_wrn()
    x = varied_inputs(n)
    noise = noise_for(x, 0.075, seed=4)
    config = DefenseConfig(beta=BETA, delta=float(initial_losses(model, x + noise).quantile(0.3)),
                           max_iters=max_iters)
    return ActiveDefense(model, config=config, engine="eager"), x + noise, config, (x, noise)


@pytest.mark.parametrize("mode", ["graph", "chunked"])
def test_buckets_are_captured_with_the_collector_paused(mode, cuda_stream_stubs):
    """GraphRunner._capture_buckets itself (CUDA stream calls stubbed): every capture runs with the cyclic
    collector off, after a collection, and the collector is back on afterwards."""
    import gc

    seen = []

    class _Runner(_DeviceUncheckedRunner):
        def _capture(self, module, b):
            seen.append((b, gc.isenabled(), _Cycle.freed))
            return _ReplayedGraph(self, module, b)

    defense, t0, config, start = _small_problem()
    runner = _Runner(defense.prefix, t0.device, tuple(t0.shape[1:]), mode=mode, max_batch=4, chunk=2)
    was = gc.isenabled()
    gc.enable()
    try:
        _Cycle.freed = 0
        _Cycle()
        with torch.no_grad(), defense.prefix.session() as module:
            runner.run(module, t0, config)
        assert gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()
    assert [b for b, _, _ in seen] == [4, 2, 1]
    assert all(not enabled and freed == 1 for _, enabled, freed in seen), seen


class _EmulatedWhile:
    """capture_while_loop's stand-in: launch() runs the start phase, then the body while ``pred`` holds and
    fewer than ``max_trips`` trips ran (the device loop's semantics), eagerly."""

    def __init__(self, body_fn, initial_pred_fn, pred, pool, max_trips):
        self.body_fn, self.initial_pred_fn, self.pred, self.max_trips = body_fn, initial_pred_fn, pred, max_trips

    def launch(self):
        self.initial_pred_fn()
        trips = 0
        while bool(self.pred) and trips < int(self.max_trips):
            self.body_fn()
            trips += 1


def test_graph_mode_runner_matches_eager_and_its_loop_keeps_no_runner(cuda_stream_stubs, monkeypatch):
    """The WHILE-loop runner's real _capture (its start phase included) with the loop emulated on CPU: same
    results as eager; and the start phase, which the loop object keeps (fsmooth.defense.while_loop.WhileLoop
    keeps it and not the body), holds buffers, not the runner: a dead runner is no reference cycle, so its
    graphs and pool go with it rather than at the collector's next run, which may fall inside a capture."""
    import fsmooth.defense.graph as graph_module

    loops = []

    def capture(*args):
        loops.append(_EmulatedWhile(*args))
        return loops[-1]

    monkeypatch.setattr(graph_module, "capture_while_loop", capture)

    defense, t0, config, start = _small_problem(n=7, max_iters=12)
    ref = defense(start[0], return_info=True, noise=start[1])  # from t0 = x + noise
    assert len(set(ref.iterations.tolist())) > 2
    runner = _DeviceUncheckedRunner(defense.prefix, t0.device, tuple(t0.shape[1:]), mode="graph", max_batch=4)
    with torch.no_grad(), defense.prefix.session() as module:
        t, iterations, loss, grew, occupancy = runner.run(module, t0, config)
    assert iterations.tolist() == ref.iterations.tolist()
    assert (t - ref.inputs).abs().max() < 1e-5
    assert len(loops) == len(runner.buckets)
    for loop in loops:
        held = [cell.cell_contents for cell in loop.initial_pred_fn.__closure__ or ()]
        assert held and all(isinstance(v, torch.Tensor) for v in held), held


@pytest.mark.parametrize("engine", ["eager", "graph", "chunked"])
def test_compiled_prefix_matches_the_eager_prefix(engine):
    """compile_prefix runs the same prefix through torch.compile (here the compiler-free aot_eager backend,
    with a symbolic batch): same iterations and inputs as without it, through the eager engine and through the
    graph runner's iteration (replayed eagerly on CPU), with odd buckets and batch 1."""
    torch._dynamo.reset()
    model = tiny_wrn()
    x = varied_inputs(7)
    noise = noise_for(x, 0.075, seed=8)
    config = DefenseConfig(beta=BETA, delta=float(initial_losses(model, x + noise).quantile(0.3)), max_iters=12)
    ref = ActiveDefense(model, config=config, engine="eager")(x, return_info=True, noise=noise)
    compiled = ActiveDefense(model, config=config, engine="eager", compile_prefix="aot_eager")
    if engine == "eager":
        got = compiled(x, return_info=True, noise=noise)
        t, iterations = got.inputs, got.iterations
        one = compiled(x[:1], return_info=True, noise=noise[:1])
        assert one.iterations.tolist() == ref.iterations[:1].tolist()
    else:
        runner = CpuRunner(compiled.prefix, x.device, tuple(x.shape[1:]), mode=engine, max_batch=3, chunk=2)
        with torch.no_grad(), compiled.prefix.session() as module:
            t, iterations, _, _, _ = runner.run(module, x + noise, config)
    assert compiled.prefix._compiled is not None  # the compiled callable ran
    assert iterations.tolist() == ref.iterations.tolist()
    assert (t - ref.inputs).abs().max() < 1e-5
    torch._dynamo.reset()


@pytest.mark.parametrize("bad", [1, None, "", 2.0])
def test_compile_prefix_rejects_what_is_not_a_bool_or_a_backend(bad):
    with pytest.raises(TypeError, match="compile_prefix"):
        ActiveDefense(tiny_wrn(), compile_prefix=bad)


@pytest.mark.parametrize("bad", ["no-such-backend", "cudagraphs"])
def test_compile_prefix_rejects_an_unknown_backend_and_cudagraphs(bad):
    with pytest.raises(ValueError, match="compile_prefix"):
        ActiveDefense(tiny_wrn(), compile_prefix=bad)


@pytest.mark.parametrize("compile_prefix", [False, "aot_eager"])
def test_captures_of_a_compiled_prefix_refuse_to_recompile(compile_prefix, cuda_stream_stubs):
    """With compile_prefix, GraphRunner._capture_buckets captures under Dynamo's error_on_recompile (a compile
    inside a capture would invalidate it obscurely); without it, Dynamo's config is left alone."""
    from torch._dynamo import config as dynamo_config

    torch._dynamo.reset()
    flags = []

    class _Runner(_DeviceUncheckedRunner):
        def _capture(self, module, b):
            flags.append(dynamo_config.error_on_recompile)
            self._iteration(module, b)  # what the capture records: no recompilation after the warm-up
            return _ReplayedGraph(self, module, b)

    model = tiny_wrn()
    x = varied_inputs(6)
    start = (x, noise_for(x, 0.075, seed=4))
    t0 = x + start[1]
    config = DefenseConfig(beta=BETA, delta=float(initial_losses(model, t0).quantile(0.3)), max_iters=5)
    defense = ActiveDefense(model, config=config, engine="eager")
    compiled = ActiveDefense(model, config=config, engine="eager", compile_prefix=compile_prefix)
    runner = _Runner(compiled.prefix, t0.device, tuple(t0.shape[1:]), mode="chunked", max_batch=4, chunk=2)
    with torch.no_grad(), compiled.prefix.session() as module:
        t, iterations, _, _, _ = runner.run(module, t0, config)
    assert flags == [compile_prefix is not False] * 3 and not dynamo_config.error_on_recompile
    ref = defense(start[0], return_info=True, noise=start[1])  # from t0 = x + noise
    assert iterations.tolist() == ref.iterations.tolist()
    torch._dynamo.reset()


def test_captures_and_launches_run_on_the_inputs_device(monkeypatch):
    """``run`` makes the runner's device current around everything it does (CUDA graphs and Triton use the
    current device, not the tensors'); on CPU the guard is the device-free stand-in, checked here."""
    import contextlib
    inside, seen = [False], []

    @contextlib.contextmanager
    def guard(self):
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    class Recording(CpuRunner):
        def _capture_buckets(self, module, sizes):
            seen.append(("capture", inside[0]))
            super()._capture_buckets(module, sizes)

        def _launch(self, b):
            seen.append(("launch", inside[0]))
            super()._launch(b)

    monkeypatch.setattr(GraphRunner, "_device_guard", guard)
    assert torch.cuda.device(torch.device("cuda", 1)).idx == 1  # what the guard is for a CUDA runner
    model = tiny_wrn()
    x = varied_inputs(3)
    config = DefenseConfig(beta=BETA, delta=1e-6, max_iters=2)
    defense = ActiveDefense(model, config=config, engine="eager")
    runner = Recording(defense.prefix, x.device, tuple(x.shape[1:]), mode="chunked", max_batch=4, chunk=1)
    with torch.no_grad(), defense.prefix.session() as module:
        runner.run(module, x, config)
    assert seen[0] == ("capture", True) and ("launch", True) in seen and all(ok for _, ok in seen)
