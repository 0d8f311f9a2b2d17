"""Engine selection on CPU: the graph -> chunked -> eager fallback of ``engine="auto"``, the runner cache
keyed by the TF32/cuDNN flags, and capture of every bucket, largest first, once.

The graph engines' host logic runs on CPU through ``CpuRunner`` (captured graphs replaced by eager replays
of the same iteration, see ``test_defense_runner``); failures are injected by monkeypatching the runner.
"""
import warnings

import pytest
import torch

import fsmooth.defense.api as api
import fsmooth.defense.graph as graph
from fsmooth.defense import ActiveDefense, DefenseConfig
from fsmooth.defense.capture_flags import capture_flags, tf32_allowed

from test_defense import BETA, initial_losses, noise_for, tiny_wrn, varied_inputs
from test_defense_runner import CpuRunner


class _Broken:
    def __init__(self, message):
        self.message = message

    def run(self, *args):
        raise RuntimeError(self.message)


def _problem(n=5):
    model = tiny_wrn()
    x = varied_inputs(n)
    noise = noise_for(x, 0.075, seed=3)
    delta = float(initial_losses(model, x + noise).quantile(0.4))
    return model, x, noise, DefenseConfig(beta=BETA, delta=delta, max_iters=20)


def _patch_engines(monkeypatch, failing: dict, available=("graph", "chunked")):
    """``auto`` resolves to ``graph`` on CPU; engines in ``failing`` raise their message, others run."""
    built = []

    def runner(self, engine, x):
        built.append(engine)
        if engine in failing:
            return _Broken(failing[engine])
        return CpuRunner(self.prefix, x.device, tuple(x.shape[1:]), mode=engine, max_batch=4)

    monkeypatch.setattr(api, "resolve_engine", lambda engine, device, enforce: "graph")
    monkeypatch.setattr(api, "unavailable_reason",
                        lambda engine, device, enforce=False: None if engine in available else "not here")
    monkeypatch.setattr(api.ActiveDefense, "_runner", runner)
    return built


def test_auto_falls_back_from_graph_to_chunked_with_the_reason(monkeypatch):
    model, x, noise, config = _problem()
    ref = ActiveDefense(model, config=config, engine="eager")(x, return_info=True, noise=noise)
    built = _patch_engines(monkeypatch, {"graph": "no conditional nodes in this driver"})
    auto = ActiveDefense(model, config=config)
    with pytest.warns(RuntimeWarning, match=r"'graph' defense engine failed \(RuntimeError: no conditional nodes "
                                            r"in this driver\); engine='auto' falls back to 'chunked'"):
        result = auto(x, return_info=True, noise=noise)
    assert result.engine == "chunked"
    assert result.iterations.tolist() == ref.iterations.tolist()
    assert (result.inputs - ref.inputs).abs().max() < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the failed engine is not tried (nor warned) again
        assert auto(x, return_info=True, noise=noise).engine == "chunked"
    assert built == ["graph", "chunked", "chunked"]


def test_auto_falls_back_through_chunked_to_eager(monkeypatch):
    model, x, noise, config = _problem()
    built = _patch_engines(monkeypatch, {"graph": "capture failed", "chunked": "also failed"})
    auto = ActiveDefense(model, config=config)
    with pytest.warns(RuntimeWarning) as record:
        assert auto(x, return_info=True, noise=noise).engine == "eager"
    messages = [str(w.message) for w in record if "defense engine failed" in str(w.message)]
    assert len(messages) == 2
    assert "'graph'" in messages[0] and "capture failed" in messages[0] and "falls back to 'chunked'" in messages[0]
    assert "'chunked'" in messages[1] and "also failed" in messages[1] and "falls back to 'eager'" in messages[1]
    assert auto(x, return_info=True, noise=noise).engine == "eager"
    assert built == ["graph", "chunked"]


def test_auto_skips_an_unavailable_chunked_engine(monkeypatch):
    model, x, noise, config = _problem()
    built = _patch_engines(monkeypatch, {"graph": "capture failed"}, available=("graph",))
    auto = ActiveDefense(model, config=config)
    with pytest.warns(RuntimeWarning, match="falls back to 'eager'"):
        assert auto(x, return_info=True, noise=noise).engine == "eager"
    assert built == ["graph"]


def test_forced_engine_failure_raises(monkeypatch):
    model, x, noise, config = _problem()
    _patch_engines(monkeypatch, {"graph": "capture failed"})
    with pytest.raises(RuntimeError, match="capture failed"):
        ActiveDefense(model, config=config, engine="graph")(x, noise=noise)


def test_capture_flags_follow_tf32_switches():
    with tf32_allowed(False):
        off = capture_flags()
    with tf32_allowed(True):
        on = capture_flags()
    assert off != on and hash(off) != hash(on)
    with tf32_allowed(False):
        assert capture_flags() == off


def test_runner_cache_is_keyed_by_tf32_flags(monkeypatch):
    monkeypatch.setattr(graph, "GraphRunner", CpuRunner)
    defense = ActiveDefense(tiny_wrn(), config=DefenseConfig(delta=100.0), engine="eager")
    x = varied_inputs(2)
    with tf32_allowed(False):
        ieee = defense._runner("chunked", x)
        assert defense._runner("chunked", x) is ieee
    with tf32_allowed(True):
        tf32 = defense._runner("chunked", x)
    assert tf32 is not ieee
    with tf32_allowed(False):
        assert defense._runner("chunked", x) is ieee
    assert defense._runner("graph", x) is not ieee


class _RecordingRunner(CpuRunner):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.captures = []

    def _capture_buckets(self, module, sizes):
        self.captures.append(list(sizes))
        super()._capture_buckets(module, sizes)


@pytest.mark.parametrize("mode", ["graph", "chunked"])
def test_every_bucket_is_captured_once_largest_first(mode):
    model, x, noise, config = _problem(n=8)
    defense = ActiveDefense(model, config=config, engine="eager")
    runner = _RecordingRunner(defense.prefix, x.device, tuple(x.shape[1:]), mode=mode, max_batch=8, chunk=2)
    with torch.no_grad(), defense.prefix.session() as module:
        runner.run(module, (x + noise)[:1], config)  # a call of one sample still captures every bucket
        runner.run(module, x + noise, config)
        assert runner.captures == [[8, 4, 2, 1]]
        with tf32_allowed(not torch.backends.cudnn.allow_tf32):  # new flags: a new signature, captured again
            runner.run(module, x + noise, config)
    assert runner.captures == [[8, 4, 2, 1], [8, 4, 2, 1]]


@pytest.mark.parametrize("allowed", [False, True])
def test_tf32_allowed_sets_and_restores_both_flags(allowed):
    before = capture_flags()
    with tf32_allowed(allowed):
        inside = capture_flags()
        assert (inside.matmul_allow_tf32, inside.cudnn_allow_tf32) == (allowed, allowed)
    assert capture_flags() == before
