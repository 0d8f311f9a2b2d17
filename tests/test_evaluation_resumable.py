"""EOT-PGD and Square save their work between steps; a chunk killed part-way resumes with the points of a run
never stopped."""
import json

import pytest
import torch
from safetensors.torch import load_file

from evaluation_helpers import (TINY_DEFENSE, Interrupting, NoisyKillable, SimulatedKill, separable_data,
                                tiny_budget, tiny_factory, trained_tiny_net)
from fsmooth._machine import machine
from fsmooth.evaluation import evaluate
from fsmooth.evaluation import resumable
from fsmooth.evaluation.attacks import APGD, EOTPGD, AdaptiveAPGD, APGDTargeted, Square, TorchattacksEOTPGD
from fsmooth.evaluation.resumable import batch_slices, run_attack
from fsmooth.evaluation.store import ChunkProgress

EPS = 3 / 255  # small: some points survive the first restart, so the second one runs


@pytest.fixture(scope="module")
def setup():
    model = trained_tiny_net()
    x, y = separable_data(n=11, seed=2)  # 11 images in batches of 4: 4 + 4 + 3
    return model, x, y


def _attack(model, loss, seed=5):
    return EOTPGD(NoisyKillable(model, 0.1), eps=EPS, steps=4, eot_iter=3, eot_batch=2, n_restarts=2, loss=loss,
                  n_target_classes=2, seed=seed)


def _run(attack, x, y, progress, rng=0):
    torch.manual_seed(rng)
    return run_attack(attack, x, y, batch_size=4, progress=progress)


@pytest.mark.parametrize("loss, save_every", [("ce", 0.0), ("dlr-targeted", 0.0), ("dlr-targeted", 1e9)],
                         ids=["ce", "dlr-targeted", "batches-only"])
def test_a_killed_attack_resumes_at_its_step_with_the_same_points(setup, tmp_path, monkeypatch, loss, save_every):
    """Killed all over the chunk, it resumes with the points of a run never stopped: from the step it saved
    before every step (0 s between saves), or from the start of its batch (saves only after each batch)."""
    model, x, y = setup
    monkeypatch.setattr(resumable, "SAVE_EVERY_S", save_every)
    attack = _attack(model, loss)
    torch.manual_seed(0)
    plain = torch.cat([attack(x[s], y[s]) for s in batch_slices(len(x), 4)])
    straight, info = _run(attack, x, y, ChunkProgress(tmp_path / "straight", 0, "d"))
    assert torch.equal(straight, plain) and info["resumed_at"] is None  # saving changes nothing
    total = attack.model.calls // 2
    states = []
    for limit in range(3, total, 4):  # kills all over the chunk: steps, restarts, targets, batches
        progress = ChunkProgress(tmp_path / f"killed{limit}", 0, "d")
        attack.model.limit, attack.model.calls = limit, 0
        with pytest.raises(SimulatedKill):
            _run(attack, x, y, progress)
        got = progress.load()
        if got is None:  # killed in its first batch before any save: the chunk starts over, seeded afresh
            assert save_every and limit < total / 3
            continue
        tensors, meta = got
        states.append((meta["slices_done"], meta["state"]))
        assert meta["machines"] == [machine()] and meta["wall_s"] > 0
        assert all(torch.equal(tensors[f"done/{i}"], straight[s])
                   for i, s in enumerate(batch_slices(len(x), 4)[:meta["slices_done"]]))
        attack.model.limit = None
        resumed, info = _run(attack, x, y, progress, rng=123)  # another random state: the saved one is restored
        assert torch.equal(resumed, straight), (limit, meta["state"])
        assert info["resumed_at"] == {"batch": meta["slices_done"], "step": meta["state"]}
        assert info["earlier_wall_s"] == meta["wall_s"]
    assert {d for d, _ in states} == ({1, 2} if save_every else {0, 1, 2})
    if save_every:
        assert not any(s for _, s in states)                        # resumed at batch starts only
        return
    assert any(s["restart"] == 1 for _, s in states if s)          # the kills reached a later restart
    if loss == "dlr-targeted":
        assert any(s["target"] == 1 for _, s in states if s)       # and the second target


def test_square_resumes_at_its_query(setup, tmp_path, monkeypatch):
    model, x, y = setup
    monkeypatch.setattr(resumable, "SAVE_EVERY_S", 0.0)
    noisy = NoisyKillable(model, 0.05)
    attack = Square(noisy, eps=16 / 255, n_queries=40, seed=3)
    straight, _ = _run(attack, x, y, ChunkProgress(tmp_path / "straight", 0, "d"))
    assert 0 < (model(straight).argmax(1) != y).sum() < len(y)       # some fooled, some survived
    for limit in (noisy.calls // 3, 2 * noisy.calls // 3):
        progress = ChunkProgress(tmp_path / f"killed{limit}", 0, "d")
        noisy.limit, noisy.calls = limit, 0
        with pytest.raises(SimulatedKill):
            _run(attack, x, y, progress)
        meta = progress.load()[1]
        assert meta["state"]["query"] > 0
        noisy.limit = None
        resumed, info = _run(attack, x, y, progress, rng=123)
        assert torch.equal(resumed, straight) and info["resumed_at"]["step"] == meta["state"]


def test_progress_of_another_attack_or_images_is_not_used(setup, tmp_path, monkeypatch):
    model, x, y = setup
    monkeypatch.setattr(resumable, "SAVE_EVERY_S", 0.0)
    progress = ChunkProgress(tmp_path, 0, "d")
    other = _attack(model, "ce", seed=6)
    other.model.limit = 7
    with pytest.raises(SimulatedKill):
        _run(other, x, y, progress)                                   # seed 6's work, killed
    fresh, _ = _run(_attack(model, "ce"), x, y, None)
    with pytest.warns(RuntimeWarning, match="another attack or for other images"):
        again, info = _run(_attack(model, "ce"), x, y, progress)
    assert torch.equal(again, fresh) and info["resumed_at"] is None
    progress.clear()
    other.model.limit, other.model.calls = 7, 0
    with pytest.raises(SimulatedKill):
        _run(other, x, y, progress)
    with pytest.warns(RuntimeWarning, match="another attack or for other images"):
        _run(_attack(model, "ce", seed=6), x[:10], y[:10], progress)  # the same attack, other images


@pytest.mark.parametrize("make", [
    lambda m, base: APGD(m, eps=3 / 255, n_iter=8, n_restarts=2, loss="dlr", seed=3),
    lambda m, base: APGDTargeted(m, eps=3 / 255, n_iter=8, n_target_classes=2, seed=3),
    lambda m, base: AdaptiveAPGD(m, base, eps=3 / 255, lam=1.0, delta=0.0, n_iter=8, seed=3),
], ids=["apgd-dlr", "apgd-t", "adaptive"])
def test_apgd_resumes_at_its_iteration(setup, tmp_path, monkeypatch, make):
    model, x, y = setup
    monkeypatch.setattr(resumable, "SAVE_EVERY_S", 0.0)
    noisy = NoisyKillable(model, 0.05)
    attack = make(noisy, model)
    straight, _ = _run(attack, x, y, ChunkProgress(tmp_path / "straight", 0, "d"))
    total = noisy.calls
    for limit in (total // 3, 2 * total // 3, total - 2):
        progress = ChunkProgress(tmp_path / f"killed{limit}", 0, "d")
        noisy.limit, noisy.calls = limit, 0
        with pytest.raises(SimulatedKill):
            _run(attack, x, y, progress)
        meta = progress.load()[1]
        noisy.limit, noisy.calls = None, 0
        resumed, info = _run(attack, x, y, progress, rng=123)
        assert torch.equal(resumed, straight) and info["resumed_at"]["step"] == meta["state"], (limit, meta)
        assert noisy.calls < total - limit // 2                 # the work before the save did not run again
    assert meta["state"]["iter"] is not None                    # the last kill came inside an iteration


def test_only_a_resumable_attack_takes_resume_or_checkpoint(setup):
    model, x, y = setup
    with pytest.raises(TypeError, match="TorchattacksEOTPGD cannot save or resume"):
        TorchattacksEOTPGD(model, eps=EPS, steps=2)(x, y, checkpoint=lambda make: None)
    assert EOTPGD.resumable and APGD.resumable and not TorchattacksEOTPGD.resumable
    assert not APGD(lambda x: x, best_loss=True).resumable    # the library's whole run
    empty, info = run_attack(_attack(model, "ce"), x[:0], y[:0], batch_size=4)
    assert empty.shape == (0, *x.shape[1:]) and info["resumed_at"] is None


def test_fsmooth_eval_resumes_a_killed_eot_chunk_at_its_step(tmp_path, monkeypatch):
    monkeypatch.setattr(resumable, "SAVE_EVERY_S", 0.0)
    model = trained_tiny_net()
    x, y = separable_data(n=8, seed=1)
    kwargs = dict(protocol="eot", eps=(8 / 255,), outer_loops=(1,), defense=TINY_DEFENSE, budget=tiny_budget(),
                  chunk_size=8, batch_size=4, quiet=True, defended_factory=tiny_factory, seed=2)
    straight = evaluate(model, x, y, out=tmp_path / "straight", **kwargs)
    killed = Interrupting(limit=12)  # of 38 calls: inside EOT-PGD-CE's second batch
    killed.load_state_dict(model.state_dict())
    killed.eval()
    with pytest.raises(SimulatedKill):
        evaluate(killed, x, y, out=tmp_path / "resumed", **kwargs)
    state = tmp_path / "resumed" / "state"
    (progress_path,) = state.rglob("*.progress.json")
    saved = json.loads(progress_path.read_text())
    assert saved["state"] is not None                                 # killed inside an attack's steps
    resumed = evaluate(model, x, y, out=tmp_path / "resumed", **kwargs)
    strip = lambda rep: [(r["run_id"], r["correct"], r["seeds"]) for r in rep["runs"]]  # noqa: E731
    assert strip(resumed) == strip(straight)
    assert not list(state.rglob("*.progress.*"))                     # a finished chunk keeps no work in flight
    meta = json.loads((progress_path.parent / "chunk00000.json").read_text())
    assert meta["resumed_at"] == {"batch": saved["slices_done"], "step": saved["state"]}
    assert meta["wall_s"] > saved["wall_s"] > 0                      # the time before the kill counts


def test_a_chunk_killed_after_its_attack_is_scored_as_if_never_stopped(tmp_path, monkeypatch):
    """Killed after the attack's last save but before the chunk's: the resumed chunk skips the attack and
    scores its points through the randomized defense with the random state a run never stopped had there."""
    from fsmooth.evaluation import runner

    model = trained_tiny_net()
    x, y = separable_data(n=8, seed=1)
    kwargs = dict(protocol="eot", eps=(8 / 255,), outer_loops=(1,), defense=TINY_DEFENSE.replace(sigma=0.2),
                  budget=tiny_budget(), chunk_size=8, batch_size=4, quiet=True, defended_factory=tiny_factory,
                  seed=2)
    evaluate(model, x, y, out=tmp_path / "straight", **kwargs)
    attack, killed = runner.run_attack, []

    def attack_then_die(*args, **kw):
        out = attack(*args, **kw)
        if not killed:
            killed.append(True)
            raise SimulatedKill("after the attack's last save")
        return out

    monkeypatch.setattr(runner, "run_attack", attack_then_die)
    with pytest.raises(SimulatedKill):
        evaluate(model, x, y, out=tmp_path / "resumed", **kwargs)
    (progress_path,) = (tmp_path / "resumed" / "state").rglob("*.progress.json")
    assert json.loads(progress_path.read_text())["slices_done"] == 2   # both batches done, the chunk not
    monkeypatch.setattr(runner, "run_attack", attack)
    evaluate(model, x, y, out=tmp_path / "resumed", **kwargs)
    a = load_file(str(tmp_path / "straight" / "per_image.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "per_image.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_save_killed_part_way_leaves_the_last_one_readable(tmp_path, monkeypatch):
    from fsmooth.evaluation import store

    progress = ChunkProgress(tmp_path, 3, "d")
    progress.save({"x": torch.arange(4.0)}, {"step": 1})
    write_json = store.write_json

    def killed_at_the_switch(path, obj):
        raise SimulatedKill("between the new tensors and the JSON that names them")

    monkeypatch.setattr(store, "write_json", killed_at_the_switch)
    with pytest.raises(SimulatedKill):
        progress.save({"x": torch.arange(4.0) + 10}, {"step": 2})
    monkeypatch.setattr(store, "write_json", write_json)
    tensors, meta = progress.load()
    assert meta == {"step": 1} and torch.equal(tensors["x"], torch.arange(4.0))  # the last complete save
    progress.save({"x": torch.arange(4.0) + 20}, {"step": 3})
    tensors, meta = progress.load()
    assert meta == {"step": 3} and torch.equal(tensors["x"], torch.arange(4.0) + 20)
    assert {p.name for p in tmp_path.iterdir()} == {"chunk00003.progress.json", progress.tensor_path.name}
    # Progress saved by the code before (one tensor file, a JSON that names none) still loads.
    progress.clear()
    assert not list(tmp_path.iterdir())
    from fsmooth.io import write_safetensors_atomic
    write_safetensors_atomic(tmp_path / "chunk00003.progress.safetensors", {"x": torch.ones(2)})
    write_json(tmp_path / "chunk00003.progress.json", {"step": 7, "fingerprint_sha256": "d"})
    tensors, meta = progress.load()
    assert meta == {"step": 7} and torch.equal(tensors["x"], torch.ones(2))
    progress.save({"x": torch.zeros(2)}, {"step": 8})
    assert not (tmp_path / "chunk00003.progress.safetensors").exists() and progress.load()[1] == {"step": 8}
