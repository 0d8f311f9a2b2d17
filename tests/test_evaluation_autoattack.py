"""fsmooth's AutoAttack loop: pyautoattack's own points, and chunks that resume at their first unsaved attack."""
import json

import pytest
import torch
from safetensors.torch import load_file

from evaluation_helpers import (TINY_DEFENSE, SimulatedKill, separable_data, tiny_budget, tiny_factory,
                                trained_tiny_net)
from fsmooth._machine import machine
from fsmooth.evaluation import autoattack as aa_module
from fsmooth.evaluation import evaluate, resumable
from fsmooth.evaluation.autoattack import STANDARD_ATTACKS, build_autoattack, run_autoattack
from fsmooth.evaluation.resumable_library import ResumableAPGD, ResumableAPGDT, ResumableFAB, ResumableSquare
from fsmooth.evaluation.store import ChunkProgress

EPS = 2 / 255  # small enough that images survive APGD-CE, so every attack of the four runs
pytestmark = pytest.mark.filterwarnings("ignore:.*reached max_iters")


@pytest.fixture(scope="module")
def setup():
    model = trained_tiny_net()
    x, y = separable_data(n=12, seed=1)
    return model, x, y


def _classifier(model, defended):
    return tiny_factory(model, TINY_DEFENSE, 1, "block1") if defended else model


def _run(clf, x, y, *, seed=3, rng=0, progress=None, eps=EPS):
    aa = build_autoattack(clf, eps, budget=tiny_budget(), seed=seed)
    torch.manual_seed(rng)
    return run_autoattack(aa, x, y, batch_size=5, progress=progress)


@pytest.mark.parametrize("defended, eps", [(True, EPS), (False, 3 / 255)], ids=["defended", "undefended"])
def test_the_points_are_those_of_run_standard_evaluation(setup, tmp_path, defended, eps):
    model, x, y = setup
    clf = _classifier(model, defended)
    progress = ChunkProgress(tmp_path, 0, "digest")
    x_adv, y_adv, flags, info = _run(clf, x, y, progress=progress, eps=eps)
    aa = build_autoattack(clf, eps, budget=tiny_budget(), seed=3)
    torch.manual_seed(0)
    with aa_module.FlagRecorder().recording() as recorder:
        for name in aa_module.aa_checks.funcs:
            aa_module.aa_checks.funcs[name] = 0
        ref_x, ref_y = aa.run_standard_evaluation(x, y, batch_size=5)
    assert torch.equal(x_adv, ref_x) and torch.equal(y_adv, ref_y)
    assert flags == recorder.flags()
    assert info == {"resumed": False, "resumed_after": [], "resumed_in": None, "earlier_wall_s": 0.0,
                    "earlier_machines": []}
    _, meta = progress.load()
    assert meta["attacks_done"] == list(STANDARD_ATTACKS)   # the comparison covered all four attacks
    robust = y_adv.eq(y)
    assert 0 < robust.sum() < len(y)                        # some points fooled, some not
    assert meta["robust_accuracy"][STANDARD_ATTACKS[-1]] == robust.sum().item() / len(y)
    assert ((x_adv - x).abs().amax() <= eps + 1e-6) and torch.equal(x_adv[robust], x[robust])


@pytest.mark.parametrize("killed_in", ["apgd-t", "square"])
def test_a_chunk_killed_during_an_attack_resumes_there_with_the_same_points(setup, tmp_path, monkeypatch, killed_in):
    model, x, y = setup
    clf = _classifier(model, True)
    perturb = aa_module._perturb
    rng_at = {}  # the global random state at each attack's first batch (the defense noise draws from it)

    def record(aa, attack, xb, yb, **kw):
        rng_at.setdefault(attack, torch.get_rng_state())
        return perturb(aa, attack, xb, yb, **kw)

    monkeypatch.setattr(aa_module, "_perturb", record)
    straight = _run(clf, x, y, progress=ChunkProgress(tmp_path / "straight", 0, "d"))
    straight_rng, rng_at = rng_at, {}
    calls = []

    def kill(aa, attack, xb, yb, **kw):
        if attack == killed_in:
            raise SimulatedKill(attack)
        return perturb(aa, attack, xb, yb, **kw)

    progress = ChunkProgress(tmp_path / "resumed", 0, "d")
    monkeypatch.setattr(aa_module, "_perturb", kill)
    with pytest.raises(SimulatedKill):
        _run(clf, x, y, progress=progress)
    before = list(STANDARD_ATTACKS[:STANDARD_ATTACKS.index(killed_in)])
    assert progress.load()[1]["attacks_done"] == before

    def spy(aa, attack, xb, yb, **kw):
        calls.append(attack)
        return record(aa, attack, xb, yb, **kw)

    monkeypatch.setattr(aa_module, "_perturb", spy)
    resumed = _run(clf, x, y, rng=123, progress=progress)  # another random state: the saved one is restored
    assert set(calls) == set(STANDARD_ATTACKS) - set(before)
    assert torch.equal(rng_at[killed_in], straight_rng[killed_in])  # the random state it was saved with
    assert torch.equal(resumed[0], straight[0]) and torch.equal(resumed[1], straight[1])
    assert resumed[2] == straight[2]                       # the checks that fired before the kill are kept
    assert resumed[3]["resumed_after"] == before and resumed[3]["earlier_wall_s"] > 0


@pytest.mark.parametrize("killed", ["between apgd-ce batches", "apgd-t iteration 3", "fab-t target 4",
                                    "square query 4"])
def test_a_chunk_killed_inside_an_attack_resumes_at_its_batch_or_query(setup, tmp_path, monkeypatch, killed):
    """Saved after each batch of an attack and inside APGD-T (before each target class, restart and iteration),
    Square (before each query) and FAB-T (before each target class), here every time: the resumed chunk has the
    points, predictions and checks of a chunk never stopped."""
    model, x, y = setup
    clf = _classifier(model, True)
    monkeypatch.setattr(resumable, "SAVE_EVERY_S", 0.0)
    perturb, seen, calls = aa_module._perturb, [], []

    def spy(aa, attack, xb, yb, resume=None, checkpoint=None):  # which batches run, and which go on
        calls.append((attack, xb.shape[0], resume is not None))
        return perturb(aa, attack, xb, yb, resume=resume, checkpoint=checkpoint)

    monkeypatch.setattr(aa_module, "_perturb", spy)
    library_calls = []  # and what reaches the library attacks' own loops
    for cls in (ResumableAPGD, ResumableAPGDT, ResumableSquare, ResumableFAB):
        def library_spy(self, x, y=None, *, resume=None, checkpoint=None, _perturb=cls.perturb):
            library_calls.append((type(self).__name__, resume is not None))
            return _perturb(self, x, y, resume=resume, checkpoint=checkpoint)
        monkeypatch.setattr(cls, "perturb", library_spy)
    straight = _run(clf, x, y, progress=ChunkProgress(tmp_path / "straight", 0, "d"))
    straight_calls, calls[:] = list(calls), []

    def kill(aa, attack, xb, yb, resume=None, checkpoint=None):
        seen.append(attack)
        if killed == "between apgd-ce batches" and seen == ["apgd-ce", "apgd-ce"]:
            raise SimulatedKill(killed)
        if killed.startswith(attack + " "):
            # killed at its 5th query (Square), 3rd target class (FAB-T), 3rd iteration (APGD-T: its checkpoint
            # comes before the first target class's run and before each iteration)
            steps, last = [], {"square": 4, "fab-t": 2, "apgd-t": 3}[attack]

            def dying(make):
                steps.append(1)
                if len(steps) > last:
                    raise SimulatedKill(killed)
                checkpoint(make)
            return perturb(aa, attack, xb, yb, resume=resume, checkpoint=dying)
        return perturb(aa, attack, xb, yb, resume=resume, checkpoint=checkpoint)

    progress = ChunkProgress(tmp_path / "resumed", 0, "d")
    monkeypatch.setattr(aa_module, "_perturb", kill)
    with pytest.raises(SimulatedKill):
        _run(clf, x, y, progress=progress)
    tensors, meta = progress.load()
    if killed == "between apgd-ce batches":
        assert meta["attacks_done"] == [] and meta["current"] == {"attack": "apgd-ce", "batch_start": 5,
                                                                    "state": None}
    elif killed == "apgd-t iteration 3":
        assert meta["attacks_done"] == ["apgd-ce"] and meta["current"]["attack"] == "apgd-t"
        state = meta["current"]["state"]
        assert (state["target_class"], state["restart"], state["iter"]) == (2, 0, 1)
        assert {"current/robust_idx", "current/state/x_adv", "current/state/y_target", "current/state/adv",
                "current/state/acc", "current/state/acc_run"} <= tensors.keys()
    elif killed == "fab-t target 4":
        assert meta["attacks_done"] == ["apgd-ce", "apgd-t"]
        assert meta["current"]["attack"] == "fab-t" and meta["current"]["state"] == {"target_class": 3, "restart": 0}
        assert {"current/robust_idx", "current/state/adv", "current/state/acc"} <= tensors.keys()
    else:
        assert meta["current"]["attack"] == "square" and meta["current"]["state"] == {"query": 3, "restart": 0}
        assert {"current/robust_idx", "current/state/x_best", "current/state/adv"} <= tensors.keys()
    monkeypatch.setattr(aa_module, "_perturb", spy)
    library_calls.clear()
    resumed = _run(clf, x, y, rng=123, progress=progress)  # another random state: the saved one is restored
    assert torch.equal(resumed[0], straight[0]) and torch.equal(resumed[1], straight[1])
    assert resumed[2] == straight[2]
    assert resumed[3]["resumed"] and resumed[3]["resumed_in"] == meta["current"]
    # Nothing finished before the kill runs again: the killed batch goes on (Square: from its saved query).
    first = len(seen) - 1
    assert [c[:2] for c in calls] == [c[:2] for c in straight_calls[first:]]
    assert calls[0][2] == (killed != "between apgd-ce batches") and not any(c[2] for c in calls[1:])
    if killed != "between apgd-ce batches":  # the saved state reached the library attack's loop
        name = {"apgd-t": "ResumableAPGDT", "fab-t": "ResumableFAB", "square": "ResumableSquare"}[killed.split()[0]]
        assert library_calls[0] == (name, True) and not any(r for _, r in library_calls[1:])


def test_progress_of_another_configuration_or_evaluation_or_unreadable_is_not_used(setup, tmp_path):
    model, x, y = setup
    clf = _classifier(model, False)
    fresh = _run(clf, x, y, seed=4)
    saved = ChunkProgress(tmp_path, 0, "d")
    _run(clf, x, y, seed=3, progress=saved)               # AutoAttack seeded 3: not this one's work
    with pytest.warns(RuntimeWarning, match="another AutoAttack configuration"):
        again = _run(clf, x, y, seed=4, progress=saved)
    assert torch.equal(again[0], fresh[0]) and again[3]["resumed_after"] == []
    with pytest.warns(RuntimeWarning, match="another evaluation"):
        assert ChunkProgress(tmp_path, 0, "other digest").load() is None
    saved.tensor_path.write_bytes(b"")
    with pytest.warns(RuntimeWarning, match="cannot be read"):
        assert saved.load() is None
    saved.clear()
    assert saved.load() is None and not saved.meta_path.exists() and not saved.tensor_path.exists()


def test_fsmooth_eval_resumes_a_killed_autoattack_chunk_at_its_attack(setup, tmp_path, monkeypatch):
    model, x, y = setup
    kwargs = dict(protocol="autoattack", eps=(EPS,), outer_loops=(1,), defense=TINY_DEFENSE, budget=tiny_budget(),
                  chunk_size=6, batch_size=6, quiet=True, defended_factory=tiny_factory, seed=5)
    evaluate(model, x, y, out=tmp_path / "straight", **kwargs)
    perturb = aa_module._perturb

    def kill(aa, attack, xb, yb, **kw):
        if attack == "square":
            raise SimulatedKill(attack)
        return perturb(aa, attack, xb, yb, **kw)

    monkeypatch.setattr(aa_module, "_perturb", kill)
    with pytest.raises(SimulatedKill):
        evaluate(model, x, y, out=tmp_path / "resumed", **kwargs)
    state = tmp_path / "resumed" / "state"
    (progress_path,) = state.rglob("*.progress.json")
    assert progress_path.name == "chunk00000.progress.json"
    progress = json.loads(progress_path.read_text())
    assert progress["machines"] == [machine()]
    other = {**machine(), "cpu": "Another CPU"}                # as if killed on another machine
    progress_path.write_text(json.dumps({**progress, "machines": [other]}))
    monkeypatch.setattr(aa_module, "_perturb", perturb)
    report = evaluate(model, x, y, out=tmp_path / "resumed", **kwargs)
    a = load_file(str(tmp_path / "straight" / "per_image.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "per_image.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(state.rglob("*.progress.*"))          # a finished chunk keeps no work in flight
    (meta_path,) = state.rglob("*aa-standard/chunk00000.json")
    meta = json.loads(meta_path.read_text())
    assert meta["resumed_after"] == ["apgd-ce", "apgd-t", "fab-t"]
    assert meta["machine"] == machine() and meta["resumed_from_machines"] == [other]
    (run,) = [r for r in report["runs"] if r["column"] == "aa-standard"]
    assert run["machines"] == [{"machine": machine(), "chunks": [0], "resumed_from": [other]},
                               {"machine": machine(), "chunks": [1]}]  # chunk 1 ran here from its start
    assert "; resumed from Another CPU" in (tmp_path / "resumed" / "report.md").read_text()
