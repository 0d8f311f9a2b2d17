"""End to end: every protocol runs on a tiny defended model; reports, resume, CLI and figures."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evaluation_helpers import (TINY_BASELINE_DEFENSE, TINY_DEFENSE, Interrupting, SimulatedKill, separable_data,
                                tiny_budget, tiny_factory, trained_tiny_net)
from fsmooth.evaluation import PROTOCOLS, evaluate
from fsmooth.evaluation.protocols import parse_protocols, plan
from fsmooth.evaluation.report import markdown

EPS = (8 / 255,)


@pytest.fixture(scope="module")
def setup():
    model = trained_tiny_net()
    x, y = separable_data(n=12, seed=1)
    return model, x, y


@pytest.fixture(scope="module")
def full_report(setup, tmp_path_factory):
    model, x, y = setup
    out = tmp_path_factory.mktemp("eval-all")
    baseline = trained_tiny_net(seed=1)
    report = evaluate(model, x[:6], y[:6], protocol="all", eps=EPS, outer_loops=(1, 2), defense=TINY_DEFENSE,
                      baseline_model=baseline, baseline_defense=TINY_BASELINE_DEFENSE, budget=tiny_budget(),
                      chunk_size=3, out=out, quiet=True, defended_factory=tiny_factory,
                      meta={"dataset": "synthetic"})
    return report, out


def test_every_protocol_runs_end_to_end(full_report):
    report, out = full_report
    runs = {r["run_id"]: r for r in report["runs"]}
    # square, fab-t and autoattack dedupe into paper
    assert {r["protocol"] for r in report["runs"]} >= set(PROTOCOLS) - {"square", "fab-t", "autoattack"}
    for k in (1, 2):
        for column in ("aa-standard", "apgd-ce", "apgd-t", "fab-t", "square", "aa-rand", "eot-pgd-ce",
                       "eot-pgd-dlr-targeted", "transfer", "transfer-maxloss", "adaptive-0.1", "adaptive+0",
                       "adaptive+100"):
            assert f"defended/ol{k}/eps8/{column}" in runs
        assert f"standard-defended/ol{k}/eps8/aa-standard" in runs
    assert "undefended/ol0/eps8/aa-standard" in runs and "defended/ol1/eps8/torchattacks-eotpgd" in runs
    for r in report["runs"]:
        assert r["n"] == 6 and 0 <= r["correct"] <= 6
        assert r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
        if "perturbation" in r:                     # every attack respects eps and [0, 1]
            assert r["perturbation"]["ok"], (r["run_id"], r["perturbation"])
            assert r["perturbation"]["max_linf"] <= r["eps"] + 1e-6
    # AutoAttack's own checks are recorded: the defense is randomized and runs autograd at inference.
    kinds = {f["kind"] for f in runs["defended/ol1/eps8/aa-standard"]["autoattack_flags"]}
    assert {"randomized defense", "dynamic defense"} <= kinds
    assert not any(f["kind"] == "dynamic defense" for f in runs["undefended/ol0/eps8/aa-standard"]["autoattack_flags"])
    # Budgets and seeds are recorded per run.
    assert runs["defended/ol1/eps8/aa-standard"]["settings"]["apgd"]["n_iter"] == tiny_budget().apgd_iter
    assert runs["defended/ol1/eps8/eot-pgd-ce"]["settings"]["eot_iter"] == tiny_budget().eot_draws
    assert len(runs["defended/ol1/eps8/eot-pgd-ce"]["seeds"]) == 2
    assert len({s for r in report["runs"] for s in r["seeds"]}) > 10   # chunks and runs get distinct seeds
    assert report["eps_sweep"]["points"][0]["eps_255"] == pytest.approx(2.0)
    # The tiny defense does not protect this model: clean accuracy stays, and the attacks find that out.
    assert runs["clean/defended/ol1"]["accuracy"] >= 0.8 and runs["clean/undefended/ol0"]["accuracy"] >= 0.8
    assert runs["undefended/ol0/eps8/aa-standard"]["accuracy"] <= 0.2
    assert runs["defended/ol1/eps8/eot-pgd-ce"]["accuracy"] <= 0.2
    # Worst case over all attacks per setting, never above any single run; re-scored with fresh defense runs.
    for s in report["settings"]:
        group = [r for r in report["runs"] if r["target"] == s["target"] and r["outer_loops"] == s["outer_loops"]
                 and r["eps"] == s["eps"] and r["kind"] != "clean"]
        assert s["worst_case"]["accuracy"] <= min([r["accuracy"] for r in group] + [s["clean"]["accuracy"]])
        if s["target"] != "undefended":
            assert s["rescore"]["runs"] == tiny_budget().rescore_runs
            assert s["rescore"]["strict_robust"]["accuracy"] <= s["worst_case"]["accuracy"]
            assert s["defense_iterations"]["clean"]["max"] <= TINY_DEFENSE.max_iters
    assert report["timing"]["clean/defended/ol2"]["cost_vs_undefended"] > 0
    md = (out / "report.md").read_text()
    assert "worst case" in md and "adaptive" in md.lower() and "Flags" in md
    assert md == markdown(json.loads((out / "report.json").read_text()))  # report.json alone renders it again
    adaptive_rows = [line for line in md.splitlines() if line.startswith("| defended |") and "/255 | " in line
                     and line.count("|") == 8]
    assert adaptive_rows and all(line.endswith("| all | max-loss |") for line in adaptive_rows)
    older = json.loads((out / "report.json").read_text())
    for r in older["runs"]:  # a report of before the settings were recorded: the library's choices
        r["settings"].pop("unfooled", None)
        r["settings"].pop("attack_all", None)
    older_rows = [line for line in markdown(older).splitlines() if line.startswith("| defended |")
                  and "/255 | " in line and line.count("|") == 8]
    assert len(older_rows) == len(adaptive_rows)
    assert all(line.endswith("| first pass right | clean |") for line in older_rows)
    for s in report["settings"]:  # the fraction correct in every re-scoring run, with its interval
        if "rescore" in s:
            a, b = s["rescore"]["correct_in_all_runs"], s["rescore"]["strict_robust"]  # then the strict one
            assert (f"| {100 * a['accuracy']:.2f} [{100 * a['ci95'][0]:.2f}, {100 * a['ci95'][1]:.2f}] | "
                    f"{100 * b['accuracy']:.2f} [{100 * b['ci95'][0]:.2f}, {100 * b['ci95'][1]:.2f}] |") in md
    assert json.loads((out / "report.json").read_text())["info"]["n"] == 6
    tensors = load_file(str(out / "per_image.safetensors"))
    assert tensors["rescore_correct/defended/ol1/eps8"].shape == (tiny_budget().rescore_runs, 6)


def test_the_report_counts_the_images_whose_defense_diverged(setup, tmp_path, caplog):
    """A step far too large moves a defended input beyond the guard's L-inf bound: the report counts those
    images per run, from the scoring forward's own verdict (per image in per_image.safetensors); an undefended
    run has none to report. A chunk saved before the count existed is left out of it, not counted as fine.
    The defense's warning, one per forward pass, is replaced by one log line per chunk."""
    import logging
    import warnings
    from dataclasses import replace

    from safetensors.torch import save_file

    from fsmooth.defense import DefenseDivergedWarning

    model, x, y = setup
    # sigma small, one step of size beta * gradient: with beta = 1e6 most inputs jump far past the bound.
    wild = replace(TINY_DEFENSE, beta=1e6, max_iters=1)
    kwargs = dict(protocol="clean", eps=EPS, outer_loops=(1, 2), defense=wild, budget=tiny_budget(), chunk_size=4,
                  quiet=True, defended_factory=tiny_factory)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO, "fsmooth.evaluation"):
        warnings.simplefilter("always")
        report = evaluate(model, x, y, out=tmp_path / "wild", **kwargs)
    assert not [w for w in caught if issubclass(w.category, DefenseDivergedWarning)]
    lines = [r.getMessage() for r in caplog.records if "divergence guard" in r.getMessage()]
    runs = {r["run_id"]: r for r in report["runs"]}
    logged = sum(int(line.split(": ")[1].split(" of ")[0]) for line in lines if "'clean/defended/ol1'" in line)
    assert lines and logged == runs["clean/defended/ol1"]["defense_diverged"]["images"]
    assert runs["clean/undefended/ol0"]["defense_diverged"] is None
    tensors = load_file(str(tmp_path / "wild" / "per_image.safetensors"))
    for run_id in ("clean/defended/ol1", "clean/defended/ol2"):
        per_image = tensors[f"diverged/{run_id}"]
        assert per_image.shape == (12,) and set(per_image.tolist()) <= {0.0, 1.0}
        assert runs[run_id]["defense_diverged"] == {"images": int(per_image.sum()), "of": 12}
        assert 0 < runs[run_id]["defense_diverged"]["images"]
    md = (tmp_path / "wild" / "report.md").read_text()
    assert f"| {runs['clean/defended/ol1']['defense_diverged']['images']} of 12 |" in md
    # An evaluation resumed from chunks saved before the count: those chunks' images are not known.
    chunk = tmp_path / "wild" / "state" / "clean_defended_ol1" / "chunk00001.safetensors"
    old = {k: v for k, v in load_file(str(chunk)).items() if k != "diverged"}
    save_file(old, str(chunk))
    again = evaluate(model, x, y, out=tmp_path / "wild", **kwargs)  # every chunk read back, none computed
    counted = {r["run_id"]: r["defense_diverged"] for r in again["runs"]}["clean/defended/ol1"]
    assert counted["of"] == 8
    per_image = load_file(str(tmp_path / "wild" / "per_image.safetensors"))["diverged/clean/defended/ol1"]
    assert per_image[4:8].eq(-1).all() and counted["images"] == int(per_image.clamp(min=0).sum())


class _ShatteredGradients(torch.nn.Module):
    """Quantises its input (zero gradient everywhere): the textbook case of gradient masking."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 255) / 255)


def test_gradient_masking_is_flagged(setup):
    model, x, y = setup
    report = evaluate(model, x[:6], y[:6], protocol="paper", eps=EPS, outer_loops=(1,),
                      budget=tiny_budget().replace(square_queries=300, rescore_runs=0), chunk_size=6, quiet=True,
                      defended_factory=lambda m, config, k, layer: _ShatteredGradients(m))
    s = next(s for s in report["settings"] if s["target"] == "defended")
    assert s["columns"]["square"] < s["columns"]["apgd-ce"]
    kinds = {f["kind"] for f in report["flags"]}
    assert "gradient masking" in kinds
    assert "zero gradients" in kinds            # AutoAttack's own check fires too


def test_plan_covers_protocols_without_duplicates():
    specs = plan(parse_protocols("paper,square,beyond"), (8 / 255, 16 / 255), (1, 10), tiny_budget())
    ids = [s.run_id for s in specs]
    assert len(ids) == len(set(ids))
    assert ids.index("defended/ol10/eps16/transfer") > ids.index("undefended/ol0/eps16/aa-standard")
    # The transfer attack's second set of points moves every image, the bare model's mistakes included.
    by_id = {s.run_id: s for s in specs}
    maxloss = by_id["undefended/ol0/eps16/apgd-ce-maxloss"]
    assert maxloss.options["kwargs"]["best_loss"] is True and maxloss.options["kwargs"]["loss"] == "ce"
    assert by_id["defended/ol10/eps16/transfer-maxloss"].source == maxloss.run_id
    assert ids.index("defended/ol10/eps16/transfer-maxloss") > ids.index(maxloss.run_id)
    assert sum(s.column == "apgd-ce-sweep" for s in specs) == len(tiny_budget().eps_sweep)
    with pytest.raises(ValueError, match="unknown protocol"):
        parse_protocols("paper,nope")
    # Each of the paper's attacks alone has a protocol of its own with the paper's run id.
    paper = {s.run_id: s for s in plan(["paper"], (8 / 255,), (1,), tiny_budget())}
    for name in ("square", "fab-t"):
        (alone,) = [s for s in plan([name], (8 / 255,), (1,), tiny_budget()) if s.kind != "clean"]
        twin = paper[alone.run_id]
        assert alone.run_id == f"defended/ol1/eps8/{name}" and alone.options == twin.options == {
            "version": "standard", "attacks": [name]}
        assert (alone.kind, alone.threat) == (twin.kind, twin.threat)


def test_autoattack_protocol_is_papers_first_run_alone():
    paper = plan(["paper"], (8 / 255,), (1,), tiny_budget())
    alone = plan(["autoattack"], (8 / 255,), (1,), tiny_budget())
    assert [s.run_id for s in alone] == ["clean/undefended/ol0", "clean/defended/ol1",
                                         "defended/ol1/eps8/aa-standard"]
    same = {s.run_id: s for s in paper}
    for spec in alone:  # same run ids and options: its chunks are the paper protocol's
        assert spec.run_id in same and spec.options == same[spec.run_id].options


def test_clean_protocol_plans_the_clean_passes_alone():
    specs = plan(["clean"], (8 / 255,), (1, 10), tiny_budget())
    assert [s.run_id for s in specs] == ["clean/undefended/ol0", "clean/defended/ol1", "clean/defended/ol10"]
    with_baseline = plan(["clean"], (8 / 255,), (1,), tiny_budget(), has_baseline=True)
    assert {s.run_id for s in with_baseline} == {"clean/undefended/ol0", "clean/defended/ol1",
                                                 "clean/standard-defended/ol1"}
    assert all(s.kind == "clean" for s in with_baseline)
    assert "clean" not in parse_protocols("all")


def test_adaptive_protocol_includes_lambda_zero_as_its_control():
    specs = plan(["adaptive"], (8 / 255,), (1,), tiny_budget().replace(lambdas=(1.0, 10.0)))
    lams = [s.options["kwargs"]["lam"] for s in specs if s.kind == "attack"]
    assert lams == [-10.0, -1.0, 0.0, 1.0, 10.0]
    assert "defended/ol1/eps8/adaptive+0" in {s.run_id for s in specs}


def test_baseline_is_defended_with_its_own_calibration_else_the_paper_preset():
    from fsmooth.defense import DefenseConfig
    from fsmooth.evaluation.api import _defense_config

    baseline = trained_tiny_net(seed=1)
    assert _defense_config(None, baseline, fallback="cifar10-standard") == DefenseConfig.preset("cifar10-standard")
    baseline.defense_defaults = {"sigma": 0.05, "beta": 3.0, "delta": 0.031}
    got = _defense_config(None, baseline, fallback="cifar10-standard")
    assert (got.sigma, got.beta, got.delta) == (0.05, 3.0, 0.031)
    assert _defense_config("cifar10-standard", baseline) == DefenseConfig.preset("cifar10-standard")


def test_resume_after_interruption_gives_the_same_result(setup, tmp_path):
    model, x, y = setup
    kwargs = dict(protocol="eot,transfer", eps=EPS, outer_loops=(1,), defense=TINY_DEFENSE, budget=tiny_budget(),
                  chunk_size=4, batch_size=2, quiet=True, defended_factory=tiny_factory, seed=7)
    reference = evaluate(model, x, y, out=tmp_path / "straight", **kwargs)

    killed = Interrupting(limit=150)
    killed.load_state_dict(model.state_dict())
    killed.eval()
    with pytest.raises(SimulatedKill):
        evaluate(killed, x, y, out=tmp_path / "resumed", **kwargs)
    state = tmp_path / "resumed" / "state"
    assert any(state.rglob("chunk?????.json")) and not (tmp_path / "resumed" / "report.json").exists()
    resumed = evaluate(model, x, y, out=tmp_path / "resumed", **kwargs)
    strip = lambda rep: [(r["run_id"], r["correct"], r["seeds"]) for r in rep["runs"]]  # noqa: E731
    assert strip(resumed) == strip(reference)
    a = load_file(str(tmp_path / "straight" / "per_image.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "per_image.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A state folder from another evaluation is refused, not silently mixed in.
    with pytest.raises(ValueError, match="different evaluation"):
        evaluate(model, x, y, out=tmp_path / "resumed", **{**kwargs, "seed": 8})


def _strip(report):
    return [(r["run_id"], r["correct"], r["seeds"]) for r in report["runs"]]


def _same_outputs(a_dir, b_dir):
    a = load_file(str(a_dir / "per_image.safetensors"))
    b = load_file(str(b_dir / "per_image.safetensors"))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


RESUME_KWARGS = dict(protocol="eot", eps=EPS, outer_loops=(1,), defense=TINY_DEFENSE, budget=tiny_budget(),
                     chunk_size=4, batch_size=2, quiet=True, defended_factory=tiny_factory)


def test_no_resume_clears_the_state_so_a_later_resume_never_mixes_runs(setup, tmp_path):
    model, x, y = setup
    reference = evaluate(model, x, y, out=tmp_path / "straight", seed=1, **RESUME_KWARGS)
    out = tmp_path / "mixed"
    evaluate(model, x, y, out=out, seed=0, **RESUME_KWARGS)          # a complete seed-0 evaluation
    killed = Interrupting(limit=60)
    killed.load_state_dict(model.state_dict())
    killed.eval()
    with pytest.raises(SimulatedKill):                                  # seed 1 from scratch, killed early
        evaluate(killed, x, y, out=out, seed=1, resume=False, **RESUME_KWARGS)
    assert any((out / "state").rglob("chunk?????.json"))              # it got some chunks done
    # seed 0's chunks are gone (seed 1's may have saved work in flight there: chunkNNNNN.progress.*)
    assert not list((out / "state" / "defended_ol1_eps8_eot-pgd-dlr-targeted").glob("chunk?????.json"))
    resumed = evaluate(model, x, y, out=out, seed=1, **RESUME_KWARGS)
    assert resumed["info"]["seed"] == 1
    assert _strip(resumed) == _strip(reference)                         # every chunk is seed 1's
    assert _same_outputs(tmp_path / "straight", out)


def _chunk_walls(out: Path) -> dict:
    """Each finished chunk's ``wall_s`` (a recomputed chunk gets a new one)."""
    return {(path.parent.name, path.name): json.loads(path.read_text())["wall_s"]
            for path in (out / "state").glob("*/chunk?????.json")}


GROWN_KWARGS = {**RESUME_KWARGS, "protocol": "transfer"}  # an attack run, its re-scoring and clean passes


@pytest.mark.parametrize("first_n", [8, 10])
def test_more_images_reuse_every_chunk_whose_images_are_unchanged(setup, tmp_path, first_n):
    model, x, y = setup
    reference = evaluate(model, x, y, out=tmp_path / "straight", seed=5, **GROWN_KWARGS)
    out = tmp_path / "grown"
    evaluate(model, x[:first_n], y[:first_n], out=out, seed=5, **GROWN_KWARGS)
    before = _chunk_walls(out)
    grown = evaluate(model, x, y, out=out, seed=5, **GROWN_KWARGS)
    after = _chunk_walls(out)
    # Chunks 0 and 1 (images 0-7) are read back; chunk 2 is computed, or recomputed when it held 2 images.
    kept = {key for key in before if after[key] == before[key]}
    assert {name for _, name in kept} == {"chunk00000.json", "chunk00001.json"}
    assert {name for _, name in after} == {"chunk00000.json", "chunk00001.json", "chunk00002.json"}
    assert _strip(grown) == _strip(reference) and _same_outputs(tmp_path / "straight", out)
    # Fewer images again: nothing is computed.
    evaluate(model, x[:8], y[:8], out=out, seed=5, **GROWN_KWARGS)
    assert _chunk_walls(out) == after
    # Other images in a chunk full in both are another evaluation's, the first chunk or any other.
    with pytest.raises(ValueError, match="different evaluation"):
        evaluate(model, x.flip(0), y.flip(0), out=out, seed=5, **GROWN_KWARGS)
    swapped = torch.cat([x[:4], x[8:12], x[4:8]]), torch.cat([y[:4], y[8:12], y[4:8]])
    with pytest.raises(ValueError, match="chunk 1 holds other images"):
        evaluate(model, *swapped, out=out, seed=5, **GROWN_KWARGS)


def _as_legacy(out: Path, images, labels) -> None:
    """Rewrite ``out``'s state as fsmooth wrote it before per-chunk stamps: one data checksum over all images,
    one digest in every chunk and progress file."""
    from fsmooth.evaluation.api import _as_images, _checksum
    from fsmooth.evaluation.store import FINGERPRINT_KEY, _digest

    marker = out / "state" / "fingerprint.json"
    legacy = {**json.loads(marker.read_text()), "data": _checksum(*_as_images(images, labels, None, "cpu"))}
    legacy.pop("images")                                                # not in the old marker
    marker.write_text(json.dumps(legacy))
    for path in (out / "state").glob("*/chunk*.json"):
        meta = json.loads(path.read_text())
        meta[FINGERPRINT_KEY] = _digest(legacy)
        path.write_text(json.dumps(meta))


@pytest.mark.parametrize("first_n, interrupted", [(8, True), (10, False)])
def test_state_written_before_per_chunk_stamps_is_adopted_and_grows(setup, tmp_path, first_n, interrupted):
    """Old state on the first 8 images whose last chunk no run finished (its image count is then found among this
    evaluation's chunk ends), or on 10 (its last chunk held 2 images: recomputed)."""
    model, x, y = setup
    reference = evaluate(model, x, y, out=tmp_path / "straight", seed=6, **GROWN_KWARGS)
    out = tmp_path / "legacy"
    evaluate(model, x[:first_n], y[:first_n], out=out, seed=6, **GROWN_KWARGS)
    _as_legacy(out, x[:first_n], y[:first_n])
    if interrupted:
        for path in (out / "state").glob("*/chunk00001.*"):
            path.unlink()
    before = _chunk_walls(out)
    grown = evaluate(model, x, y, out=out, seed=6, **GROWN_KWARGS)
    after = _chunk_walls(out)
    kept = {key for key in before if after[key] == before[key]}
    assert {name for _, name in kept} == {"chunk00000.json"} | ({"chunk00001.json"} if not interrupted else set())
    assert {name for _, name in after} == {"chunk00000.json", "chunk00001.json", "chunk00002.json"}
    assert _strip(grown) == _strip(reference) and _same_outputs(tmp_path / "straight", out)
    marker = json.loads((out / "state" / "fingerprint.json").read_text())
    assert [len(entry["chunks"]) for entry in marker["legacy_stamps"]] == [2] and marker["images"] == 12
    # The marker keeps the old stamps: a later run still reads those chunks back.
    evaluate(model, x, y, out=out, seed=6, **GROWN_KWARGS)
    assert _chunk_walls(out) == after
    # Legacy state whose images are not the first ones is another evaluation's.
    other = tmp_path / "other"
    evaluate(model, x[4:12], y[4:12], out=other, seed=6, **GROWN_KWARGS)
    _as_legacy(other, x[4:12], y[4:12])
    with pytest.raises(ValueError, match="different evaluation"):
        evaluate(model, x, y, out=other, seed=6, **GROWN_KWARGS)


def test_a_rank_that_does_not_own_the_state_reads_the_legacy_stamps(tmp_path):
    from fsmooth.evaluation.store import ChunkedData, ChunkStore, _digest

    data = ChunkedData(checksums=("a", "b"), chunk_size=4, images=6, prefix_checksum=lambda k: f"prefix{k}")
    legacy = {"data": "prefix6", "seed": 0}
    (tmp_path / "run").mkdir()
    (tmp_path / "fingerprint.json").write_text(json.dumps(legacy))
    (tmp_path / "run" / "chunk00001.json").write_text(json.dumps({"hi": 6, "fingerprint_sha256": _digest(legacy)}))
    fingerprint = {"data": ["a", "b"], "seed": 0}
    follower = ChunkStore(tmp_path, fingerprint, owner=False, data=data)  # built before the owner, as in torchrun
    owner = ChunkStore(tmp_path, fingerprint, data=data)
    assert owner.finished("run", 1) and follower.finished("run", 1)
    assert _digest(legacy) in follower.accepted(0) and owner.stamp(0) != owner.stamp(1)
    # A chunk's stamp covers its images: other images in chunk 1 do not take its files.
    owner.save("run", 0, {"t": torch.ones(1)}, {"hi": 4})
    other = ChunkedData(checksums=("c", "b"), chunk_size=4, images=6, prefix_checksum=lambda k: f"other{k}")
    follower = ChunkStore(tmp_path, {"data": ["c", "b"], "seed": 0}, owner=False, data=other)
    assert follower.finished("run", 1) and not follower.finished("run", 0)
    with pytest.raises(ValueError, match="checksums"):
        ChunkStore(tmp_path, {"data": ["a"], "seed": 0}, data=data)
    # A torn marker is kept aside (its legacy stamps can be recovered by hand), never overwritten.
    text = (tmp_path / "fingerprint.json").read_text()
    (tmp_path / "fingerprint.json").write_text(text[:30])
    with pytest.warns(RuntimeWarning, match="unreadable"):
        ChunkStore(tmp_path, fingerprint, data=data)
    assert (tmp_path / "fingerprint.unreadable.json").read_text() == text[:30]
    assert json.loads((tmp_path / "fingerprint.json").read_text())["images"] == 6


def test_chunks_and_work_in_flight_record_their_run_id_which_loading_leaves_out(tmp_path):
    from fsmooth.evaluation.store import ChunkStore

    store = ChunkStore(tmp_path, {"data": ["a"], "seed": 0})
    store.save("defended/ol1/eps8/square", 0, {"t": torch.ones(1)}, {"hi": 4})
    store.progress("defended/ol1/eps16/square", 0).save({"t": torch.zeros(1)}, {"state": {"query": 3}})
    assert json.loads((tmp_path / "defended_ol1_eps8_square" / "chunk00000.json").read_text())["run"] == \
        "defended/ol1/eps8/square"
    assert store.other_runs([]) == ["defended/ol1/eps16/square", "defended/ol1/eps8/square"]
    assert store.other_runs(["defended/ol1/eps8/square"]) == ["defended/ol1/eps16/square"]
    assert store.load("defended/ol1/eps8/square", 0)[1] == {"hi": 4}  # the run id stays in the file
    assert store.progress("defended/ol1/eps16/square", 0).load()[1] == {"state": {"query": 3}}


def test_a_rerun_that_computes_nothing_keeps_the_reports_times(setup, tmp_path):
    import json

    model, x, y = setup
    out = tmp_path / "run"
    evaluate(model, x, y, out=out, seed=3, **RESUME_KWARGS)
    path = out / "report.json"
    first = json.loads(path.read_text())
    times = {"started": "2000-01-01T00:00:00+00:00", "finished": "2000-01-01T00:01:00+00:00", "world_size": 2}
    first["info"].update(times)                      # times (and ranks) no rerun here could write
    path.write_text(json.dumps(first, indent=2))
    again = evaluate(model, x, y, out=out, seed=3, **RESUME_KWARGS)
    assert {k: again["info"][k] for k in times} == times
    assert json.loads(path.read_text()) == first     # the finished report is left as it was
    # Other results (here the clean protocol alone) are a new report, with the times of its own run.
    other = evaluate(model, x, y, out=out, seed=3, **{**RESUME_KWARGS, "protocol": "clean"})
    assert other["info"]["started"] != times["started"]
    assert json.loads(path.read_text())["info"]["finished"] == other["info"]["finished"]


def test_each_chunk_records_the_machine_it_ran_on(setup, tmp_path):
    from fsmooth._machine import machine

    model, x, y = setup
    out = tmp_path / "run"
    kwargs = dict(RESUME_KWARGS, protocol="clean", seed=3)
    first = evaluate(model, x, y, out=out, **kwargs)
    here = machine()
    assert here["cpu"] and here["cpu_capability"] and here["threads"] >= 1 and here["torch"] == torch.__version__
    run = next(r for r in first["runs"] if r["run_id"] == "clean/defended/ol1")
    assert run["machines"] == [{"machine": here, "chunks": [0, 1, 2]}]
    # Chunk 1 as if computed elsewhere, chunk 2 as saved before chunks recorded their machine.
    folder = out / "state" / "clean_defended_ol1"
    other = {**here, "cpu": "Another CPU", "cpu_capability": "AVX2"}
    for chunk, edit in ((1, lambda m: m.update(machine=other)), (2, lambda m: m.pop("machine"))):
        path = folder / f"chunk{chunk:05d}.json"
        meta = json.loads(path.read_text())
        edit(meta)
        path.write_text(json.dumps(meta))
    again = evaluate(model, x, y, out=out, **kwargs)
    run = next(r for r in again["runs"] if r["run_id"] == "clean/defended/ol1")
    assert run["machines"] == [{"machine": here, "chunks": [0]}, {"machine": other, "chunks": [1]},
                               {"machine": None, "chunks": [2]}]
    assert run["correct"] == next(r for r in first["runs"] if r["run_id"] == "clean/defended/ol1")["correct"]
    text = (out / "report.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("n = "))
    assert f"{here['cpu']} ({here['cpu_capability']}, {here['threads']} threads)" in header
    assert header.count(f"torch {torch.__version__}") == 1             # named once
    section = text[text.index("## Machines"):text.index("## Flags")]
    assert "Another CPU (AVX2" in section and "not recorded" in section and "clean/defended/ol1 (1)" in section
    assert f"{here['cpu']} ({here['cpu_capability']}, {here['threads']} threads)" in section


def test_corrupt_and_foreign_chunks_are_recomputed_with_a_warning(setup, tmp_path):
    import shutil
    import warnings

    model, x, y = setup
    reference = evaluate(model, x, y, out=tmp_path / "straight", seed=3, **RESUME_KWARGS)
    out = tmp_path / "damaged"
    shutil.copytree(tmp_path / "straight", out)
    evaluate(model, x, y, out=tmp_path / "other", seed=4, **RESUME_KWARGS)
    folder = out / "state" / "defended_ol1_eps8_eot-pgd-ce"
    (folder / "chunk00000.safetensors").write_bytes(b"")                # zero-byte tensors
    torn = folder / "chunk00001.json"
    torn.write_text(torn.read_text()[:25])                              # torn JSON
    for suffix in (".safetensors", ".json"):                            # a chunk of another evaluation
        shutil.copy(tmp_path / "other" / "state" / folder.name / f"chunk00002{suffix}", folder)
    # A record without its tensors (as results/ commits finished chunks): said so, not called unreadable.
    (out / "state" / "defended_ol1_eps8_eot-pgd-dlr-targeted" / "chunk00001.safetensors").unlink()
    with pytest.warns(RuntimeWarning) as record:
        again = evaluate(model, x, y, out=out, seed=3, **RESUME_KWARGS)
    messages = [str(w.message) for w in record if "recomputing chunk" in str(w.message)]
    assert len(messages) == 4, messages
    assert "chunk00000.safetensors" in messages[0] and "cannot be read" in messages[0]
    assert "chunk00001.json" in messages[1] and "cannot be read" in messages[1]
    assert "chunk00002.json" in messages[2] and "another evaluation" in messages[2]
    assert "eot-pgd-dlr-targeted" in messages[3] and "cannot be read" not in messages[3]
    assert "chunk00001.json is here but its tensors chunk00001.safetensors are not" in messages[3]
    assert _strip(again) == _strip(reference) and _same_outputs(tmp_path / "straight", out)
    with warnings.catch_warnings(record=True) as later:                 # repaired: nothing left to recompute
        warnings.simplefilter("always")
        evaluate(model, x, y, out=out, seed=3, **RESUME_KWARGS)
    assert not [w for w in later if "recomputing chunk" in str(w.message)]


def test_a_rescore_chunk_is_recomputed_when_the_points_it_rescored_change(setup, tmp_path, caplog):
    from safetensors.torch import save_file

    model, x, y = setup
    out = tmp_path / "eval"
    reference = evaluate(model, x, y, out=out, seed=3, **RESUME_KWARGS)
    before = _chunk_walls(out)
    # Chunk 1's attack points change under the same stamps (as when an attack chunk is recomputed on another
    # machine): the re-scoring of chunk 1 ran on other points, and only it is recomputed.
    for run in ("defended_ol1_eps8_eot-pgd-ce", "defended_ol1_eps8_eot-pgd-dlr-targeted"):
        path = out / "state" / run / "chunk00001.safetensors"
        tensors = load_file(str(path))
        tensors["x_adv"] = (tensors["x_adv"] + 1e-3).clamp(0, 1)
        save_file(tensors, str(path))
    with caplog.at_level("INFO", logger="fsmooth.evaluation.runner"):
        evaluate(model, x, y, out=out, seed=3, **RESUME_KWARGS)
    changed = {key for key, wall in _chunk_walls(out).items() if before[key] != wall}
    assert {(folder.split("_")[0], name) for folder, name in changed} == {("rescore", "chunk00001.json")}
    assert "recomputing chunk 1" in caplog.text and "points it re-scored" in caplog.text
    # Unchanged points: every re-scoring chunk is read back, and the report is the first one.
    caplog.clear()
    with caplog.at_level("INFO", logger="fsmooth.evaluation.runner"):
        again = evaluate(model, x, y, out=tmp_path / "eval", seed=3, **RESUME_KWARGS)
    assert "recomputing" not in caplog.text
    assert [r["correct"] for r in again["runs"]] == [r["correct"] for r in reference["runs"]]


def test_an_attack_chunk_saved_with_other_settings_is_recomputed(setup, tmp_path):
    """A finished chunk records its attack's settings; one attacked otherwise (here: saved before ``unfooled``
    existed, when the adaptive attack returned an image it did not fool clean) is not this attack's result."""
    model, x, y = setup
    kwargs = {**RESUME_KWARGS, "protocol": "adaptive", "budget": tiny_budget().replace(lambdas=(1.0,))}
    out = tmp_path / "eval"
    reference = evaluate(model, x, y, out=out, seed=3, **kwargs)
    before = _chunk_walls(out)
    legacy = out / "state" / "defended_ol1_eps8_adaptive+1" / "chunk00001.json"
    meta = json.loads(legacy.read_text())
    assert meta["settings"]["unfooled"] == "max-loss" and meta["settings"]["attack_all"] is True
    del meta["settings"]["unfooled"]
    legacy.write_text(json.dumps(meta))
    # A partial report attacks nothing: it ends before the chunk the evaluation will recompute, and says so.
    state = _digests(out / "state")
    with pytest.warns(RuntimeWarning, match="counted as not finished, chunk 1 of 'defended/ol1/eps8/adaptive\\+1'"):
        partial = evaluate(model, x, y, out=out, seed=3, partial=True, **kwargs)
    assert partial["info"]["partial"] == {"images": 4, "planned": 12, "chunks": 1, "left_out": [],
                                          "not_selected": []}
    part = load_file(str(out / "partial" / "per_image.safetensors"))
    whole = load_file(str(out / "per_image.safetensors"))
    for key in part:
        if not key.startswith(("candidates/", "examples/")):
            assert torch.equal(part[key], whole[key][..., :4]), key
    # Its first chunk too: the run is left out, as one that has finished nothing.
    first = legacy.with_name("chunk00000.json")
    kept = first.read_text()
    older = json.loads(kept)
    del older["settings"]["unfooled"]
    first.write_text(json.dumps(older))
    with pytest.warns(RuntimeWarning, match="counted as not finished, chunk 0 of"):
        partial = evaluate(model, x, y, out=out, seed=3, partial=True, **kwargs)
    assert partial["info"]["partial"] == {"images": 12, "planned": 12, "chunks": 3,
                                          "left_out": ["defended/ol1/eps8/adaptive+1"], "not_selected": []}
    first.write_text(kept)
    assert _digests(out / "state") == state
    with pytest.warns(RuntimeWarning, match="recomputing chunk 1 of 'defended/ol1/eps8/adaptive\\+1'.*other settings"):
        again = evaluate(model, x, y, out=out, seed=3, **kwargs)
    changed = {key for key, wall in _chunk_walls(out).items() if before[key] != wall}
    assert ("defended_ol1_eps8_adaptive+1", "chunk00001.json") in changed
    assert not {key for key in changed if key[0].startswith("defended") and key != (legacy.parent.name, legacy.name)}
    assert [r["correct"] for r in again["runs"]] == [r["correct"] for r in reference["runs"]]
    from fsmooth.evaluation.summary import summarize, summary_markdown
    joined = summarize([out])
    assert [a["unfooled"] for a in joined["adaptive"]] == ["max-loss"] * 3   # lambda -1, 0 and 1
    assert [a["attacked"] for a in joined["adaptive"]] == ["all"] * 3
    assert summary_markdown(joined).count("| all | max-loss |") == 3


def _digests(folder):
    import hashlib
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_partial_report_covers_the_finished_chunks_and_attacks_nothing(setup, tmp_path, monkeypatch):
    """An evaluation killed in its last attack run: partial=True reports the chunks every attack run finished
    (here 2 of 3), equal to the finished evaluation's first 8 images, and writes nothing into its state."""
    model, x, y = setup
    reference = evaluate(model, x, y, out=tmp_path / "straight", seed=5, **RESUME_KWARGS)
    for limit, finished_dlr in ((4, 0), (55, 0), (85, 2)):  # killed in the first run, before, inside the second
        out = tmp_path / f"killed-{limit}"
        killed = Interrupting(limit=limit)
        killed.load_state_dict(model.state_dict())
        killed.eval()
        with pytest.raises(SimulatedKill):
            evaluate(killed, x, y, out=out, seed=5, **RESUME_KWARGS)
        state = out / "state" / "defended_ol1_eps8_eot-pgd-dlr-targeted"
        assert len(list(state.glob("chunk?????.json"))) == finished_dlr
        if limit == 4:
            with pytest.raises(ValueError, match="no attack run has finished a chunk yet"):
                evaluate(model, x, y, out=out, seed=5, partial=True, **RESUME_KWARGS)
        elif not finished_dlr:  # the run with no finished chunk is left out, and the report says so
            ce_only = evaluate(model, x, y, out=out, seed=5, partial=True, **RESUME_KWARGS)
            dlr = "defended/ol1/eps8/eot-pgd-dlr-targeted"
            assert ce_only["info"]["partial"] == {"images": 12, "planned": 12, "chunks": 3, "left_out": [dlr],
                                                 "not_selected": []}
            assert dlr not in {r["run_id"] for r in ce_only["runs"]}
            assert "defended/ol1/eps8/eot-pgd-ce" in {r["run_id"] for r in ce_only["runs"]}
            assert f"Left out, not having finished a chunk yet (the worst case here is without them): `{dlr}`" in \
                (out / "partial" / "report.md").read_text()
    before = _digests(out / "state")
    report = evaluate(model, x, y, out=out, seed=5, partial=True, **RESUME_KWARGS)
    assert _digests(out / "state") == before  # no chunk computed, rewritten or added
    assert any((out / "partial" / "state").glob("rescore_*/chunk*.json"))  # its re-scoring lives apart
    assert report["info"]["partial"] == {"images": 8, "planned": 12, "chunks": 2, "left_out": [],
                                          "not_selected": []}
    assert report["info"]["n"] == 8
    assert not (out / "report.json").exists() and (out / "partial" / "report.json").is_file()
    assert "**Partial report:** the first 8 of the 12 planned images" in (out / "partial" / "report.md").read_text()
    for mine, full in zip(report["runs"], reference["runs"]):
        assert mine["run_id"] == full["run_id"] and mine["correct"] <= full["correct"]
    part = load_file(str(out / "partial" / "per_image.safetensors"))
    whole = load_file(str(tmp_path / "straight" / "per_image.safetensors"))
    assert part.keys() == whole.keys()
    for key in part:
        if not key.startswith(("candidates/", "examples/")):
            assert torch.equal(part[key], whole[key][..., :8]), key
    from fsmooth.evaluation.summary import summarize
    with pytest.warns(RuntimeWarning, match="partial report"):  # summarize says what it was given
        summarize([out / "partial"])
    # A finished chunk that cannot be read is an error here, never attacked again.
    torn = out / "state" / "defended_ol1_eps8_eot-pgd-ce" / "chunk00001.safetensors"
    saved = torn.read_bytes()
    torn.write_bytes(b"")
    with pytest.warns(RuntimeWarning, match="recomputing chunk 1"), pytest.raises(RuntimeError, match="attacks nothing"):
        evaluate(model, x, y, out=out, seed=5, partial=True, **RESUME_KWARGS)
    torn.write_bytes(saved)
    # The evaluation then finishes exactly as if never looked at.
    final = evaluate(model, x, y, out=out, seed=5, **RESUME_KWARGS)
    assert _strip(final) == _strip(reference) and _same_outputs(tmp_path / "straight", out)
    with pytest.raises(ValueError, match="needs out and resume"):
        evaluate(model, x, y, seed=5, partial=True, **RESUME_KWARGS)
    with pytest.raises(ValueError, match="needs out and resume"):
        evaluate(model, x, y, out=out, seed=5, partial=True, resume=False, **RESUME_KWARGS)
    assert (out / "report.json").is_file()  # resume=False was refused before it deleted anything
    with pytest.raises(ValueError, match="holds no evaluation state"):
        evaluate(model, x, y, out=tmp_path / "typo", seed=5, partial=True, **RESUME_KWARGS)
    assert not (tmp_path / "typo").exists()
    import fsmooth.evaluation.api as api
    monkeypatch.setattr(api, "rank_and_world", lambda: (0, 2))
    with pytest.raises(ValueError, match="one process"):
        evaluate(model, x, y, out=out, seed=5, partial=True, **RESUME_KWARGS)


def test_a_run_ahead_of_the_others_is_reported_at_its_own_n_by_selecting_it(setup, tmp_path):
    """A partial report has one n, the images every selected run has finished; the same command with fewer eps
    selects the run that is ahead and reports it at its own n, equal to the finished evaluation's numbers."""
    model, x, y = setup
    both = {**RESUME_KWARGS, "eps": (8 / 255, 16 / 255)}
    out = tmp_path / "eval"
    finished = evaluate(model, x, y, out=out, seed=7, **both)
    behind = out / "state" / "defended_ol1_eps16_eot-pgd-dlr-targeted"
    for path in behind.glob("chunk00002.*"):  # eps 16 as if still running its last chunk
        path.unlink()
    (out / "report.json").unlink()
    assert evaluate(model, x, y, out=out, seed=7, partial=True, **both)["info"]["partial"] == {
        "images": 8, "planned": 12, "chunks": 2, "left_out": [], "not_selected": []}
    in_flight = out / "state" / "defended_ol1_eps16_eot-pgd-ce"  # holding work in flight only, no finished chunk
    meta = (in_flight / "chunk00000.json").read_text()
    for path in in_flight.glob("chunk?????.*"):
        path.unlink()
    (in_flight / "chunk00000.progress.json").write_text(meta)
    ahead = evaluate(model, x, y, out=out, seed=7, partial=True, **{**both, "eps": (8 / 255,)})
    behind_runs = ["defended/ol1/eps16/eot-pgd-ce", "defended/ol1/eps16/eot-pgd-dlr-targeted"]  # and it says so
    assert ahead["info"]["partial"] == {"images": 12, "planned": 12, "chunks": 3, "left_out": [],
                                        "not_selected": behind_runs}
    assert ("Not selected by this command, though the state holds their work (select them to report them): "
            "`defended/ol1/eps16/eot-pgd-ce`, `defended/ol1/eps16/eot-pgd-dlr-targeted`.") in \
        (out / "partial" / "report.md").read_text()
    for path in behind.glob("chunk*.json"):  # state saved before chunks recorded their run: named by its folder
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "run"}))
    older = evaluate(model, x, y, out=out, seed=7, partial=True, **{**both, "eps": (8 / 255,)})
    assert older["info"]["partial"]["not_selected"] == [behind_runs[0], "defended_ol1_eps16_eot-pgd-dlr-targeted"]
    full = {r["run_id"]: r["correct"] for r in finished["runs"]}
    assert ahead["runs"] and all(r["correct"] == full[r["run_id"]] for r in ahead["runs"])
    assert all("eps16" not in r["run_id"] for r in ahead["runs"])


def test_bad_arguments_are_named(setup):
    model, x, y = setup
    with pytest.raises(ValueError, match="eps"):
        evaluate(model, x, y, eps=(8,), defended_factory=tiny_factory)
    with pytest.raises(ValueError, match="outer_loops"):
        evaluate(model, x, y, outer_loops=(0,), defended_factory=tiny_factory)
    with pytest.raises(ValueError, match="labels"):
        evaluate(model, x, y[:3], defended_factory=tiny_factory)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(model, x, y, n=0, defended_factory=tiny_factory)
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        evaluate(model, x * 3, y, defended_factory=tiny_factory)


def _tiny_checkpoint_and_image_folder(root):
    """A saved WRN-10-1 checkpoint and an ImageFolder tree of 8x8 PNGs (one per class and split)."""
    import numpy as np
    from PIL import Image

    from fsmooth.checkpoint import save_checkpoint
    from fsmooth.models import WideResNet

    torch.manual_seed(0)
    save_checkpoint(root / "ckpt", WideResNet(10, 1).eval(), {"arch": "wrn-10-1", "dataset": "cifar10",
                                                               "layer": "block1"})
    rng = np.random.default_rng(0)
    files = []
    for split in ("train", "test"):
        for c in range(10):
            (root / "data" / split / f"class{c}").mkdir(parents=True)
            path = root / "data" / split / f"class{c}" / "0.png"
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
            if split == "test":
                files.append(path)
    return root / "ckpt", root / "data", files


@pytest.mark.filterwarnings("ignore:.*(diverged|reached max_iters)")  # paper beta on an untrained net
def test_cli_eval_and_figures_on_a_real_checkpoint_and_image_folder(tmp_path, monkeypatch, capsys):
    import numpy as np
    from PIL import Image

    from fsmooth.checkpoint import load_model
    from fsmooth.cli import main

    monkeypatch.setenv("FSMOOTH_CACHE", str(tmp_path / "cache"))
    ckpt, data, test_files = _tiny_checkpoint_and_image_folder(tmp_path)
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--protocol", "paper,eps-sweep",
                 "--n", "4", "--eps", "8", "--outer-loops", "1", "--out", str(out), "--budget", "tiny",
                 "--max-iters", "2", "--sweep-eps", "4", "32"]) == 0
    report = json.loads((out / "report.json").read_text())
    info = report["info"]
    assert info["n"] == 4 and info["defense"]["max_iters"] == 2
    assert info["budget"]["eps_sweep"] == [4 / 255, 32 / 255]
    assert info["checkpoint"] == str(ckpt) and info["checkpoint_meta"]["arch"] == "wrn-10-1"
    assert "Robust accuracy" in capsys.readouterr().out
    # The undefended clean row is the checkpoint's own prediction on the first 4 test images of the evaluation
    # order: the folder is sorted by class (one image each), so a fixed permutation of it, never class 0 alone.
    from fsmooth.data import evaluation_order
    _, order, how = evaluation_order(torch.arange(10), torch.arange(10))
    assert "fixed permutation" in how and info["image_order"] == how
    assert len(set(order[:4].tolist())) == 4 and not torch.equal(order[:4], torch.arange(4))
    model, _ = load_model(ckpt)
    pixels = np.stack([np.asarray(Image.open(test_files[i]).convert("RGB")) for i in order[:4].tolist()])
    with torch.no_grad():
        pred = model(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255).argmax(1)
    clean = next(r for r in report["runs"] if r["run_id"] == "clean/undefended/ol0")
    assert clean["correct"] == int((pred == order[:4]).sum())
    tensors = load_file(str(out / "per_image.safetensors"))
    assert torch.equal(tensors["labels"], order[:4]) and torch.equal(tensors["pred/clean/undefended/ol0"], pred)
    assert f"Images: the first n = 4 of {how}." in (out / "report.md").read_text()
    # --partial on the finished evaluation: every image, reported apart, nothing attacked again.
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--protocol", "paper,eps-sweep",
                 "--n", "4", "--eps", "8", "--outer-loops", "1", "--out", str(out), "--budget", "tiny",
                 "--max-iters", "2", "--sweep-eps", "4", "32", "--partial", "--quiet"]) == 0
    partial = json.loads((out / "partial" / "report.json").read_text())
    assert partial["info"]["partial"] == {"images": 4, "planned": 4, "chunks": 1, "left_out": [],
                                           "not_selected": []}
    assert [r["correct"] for r in partial["runs"]] == [r["correct"] for r in report["runs"]]
    with pytest.raises(SystemExit):                       # a model source is required, and only one
        main(["eval", "--checkpoint", "a", "--pretrained", "b"])
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps({"epoch": e, "train_acc": 0.1 * e, "feature_loss": 0.05 / (e + 1)})
                             for e in range(5)) + "\n{\"epoch\": 5, \"trunc")
    figs = tmp_path / "figs"
    assert main(["figures", "--report", str(out), "--checkpoint", str(ckpt), "--log", str(log),
                 "--out", str(figs)]) == 0
    pngs = sorted(p.name for p in figs.glob("*.png"))
    assert {"accuracy_vs_eps.png", "feature_panels.png", "training_0.png"} <= set(pngs)
    assert any(p.startswith("iterations_") for p in pngs)
    assert all((figs / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_summarize_joins_reports_into_one_worst_case(setup, tmp_path):
    """Two evaluations of one model (other protocols, other n): the joined worst case is the AND of both
    reports' per-image verdicts on the images both evaluated, and every column keeps its own n."""
    from fsmooth.cli import main
    from fsmooth.evaluation.summary import summarize

    model, x, y = setup
    kwargs = dict(eps=EPS, outer_loops=(1,), defense=TINY_DEFENSE, budget=tiny_budget(), chunk_size=4,
                  quiet=True, defended_factory=tiny_factory)
    a = evaluate(model, x, y, protocol="eot", out=tmp_path / "a", meta={"checkpoint": "runs/fs/checkpoints/e1"},
                 **kwargs)
    b = evaluate(model, x[:8], y[:8], protocol="square,clean", out=tmp_path / "b",
                 meta={"checkpoint": "runs/fs/checkpoints/e1"}, **kwargs)
    evaluate(model, x[:4], y[:4], protocol="clean", out=tmp_path / "c", meta={"checkpoint": "runs/fs/checkpoints/e1"},
             **kwargs)
    assert "Robust accuracy" not in (tmp_path / "c" / "report.md").read_text()   # no attack, no empty table
    summary = summarize([tmp_path / "a", tmp_path / "b", tmp_path / "c"], {"fs": "feature-smoothed"})
    assert list(summary["models"]) == ["feature-smoothed"]
    (s,) = summary["settings"]
    assert set(s["columns"]) == {"eot-pgd-ce", "eot-pgd-dlr-targeted", "square"}
    assert s["columns"]["eot-pgd-ce"]["n"] == 12 and s["columns"]["square"]["n"] == 8
    ra = load_file(str(tmp_path / "a" / "per_image.safetensors"))["robust/defended/ol1/eps8"]
    rb = load_file(str(tmp_path / "b" / "per_image.safetensors"))["robust/defended/ol1/eps8"]
    both = ra[:8].bool() & rb.bool()
    assert s["worst_case"]["n"] == 8 and s["worst_case"]["correct"] == int(both.sum())
    assert s["worst_case"]["correct"] <= min(a["settings"][0]["worst_case"]["correct"],
                                             b["settings"][0]["worst_case"]["correct"])
    assert s["strict"]["correct"] <= s["worst_case"]["correct"]
    assert {(c["target"], c["n"]) for c in summary["clean"]} >= {("defended", 12), ("defended", 8), ("defended", 4)}
    # One attack in two reports (here the eot protocol again on the first 4 images): its column is the run on
    # more images, whichever order the reports come in; the worst case still joins both.
    evaluate(model, x[:4], y[:4], protocol="eot", out=tmp_path / "d", meta={"checkpoint": "runs/fs/checkpoints/e1"},
             **kwargs)
    for order in (["a", "d"], ["d", "a"]):
        (s2,) = summarize([tmp_path / f for f in order])["settings"]
        assert s2["columns"]["eot-pgd-ce"]["n"] == 12 and s2["columns"]["eot-pgd-ce"]["report"] == str(tmp_path / "a")
        assert s2["worst_case"]["n"] == 4
    # The command writes both files; a folder without a report is named.
    assert main(["summarize", str(tmp_path / "a"), str(tmp_path / "b"), "--name", "fs=feature-smoothed",
                 "--out", str(tmp_path / "summary")]) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["settings"][0]["worst_case"] == s["worst_case"]
    assert "**worst case**" in (tmp_path / "summary.md").read_text()
    with pytest.raises(FileNotFoundError, match="no report.json"):
        summarize([tmp_path / "a", tmp_path])
    evaluate(model, x[4:8], y[4:8], protocol="clean", out=tmp_path / "other", **kwargs)
    with pytest.raises(ValueError, match="other images"):
        summarize([tmp_path / "a", tmp_path / "other"])
    with pytest.raises(SystemExit):                        # --name takes LABEL=NAME
        main(["summarize", str(tmp_path / "a"), "--name", "fs", "--out", str(tmp_path / "s2")])


def test_summarize_refuses_reports_taken_in_another_image_order(setup, tmp_path):
    """Reports of one data set taken in two orders hold other images under the same index: never joined."""
    from fsmooth.evaluation.summary import summarize
    model, x, y = setup
    kwargs = dict(protocol="clean", eps=EPS, outer_loops=(1,), defense=TINY_DEFENSE, budget=tiny_budget(),
                  chunk_size=6, quiet=True, defended_factory=tiny_factory)
    evaluate(model, x, y, out=tmp_path / "a", meta={"image_order": "the source's order"}, **kwargs)
    evaluate(model, x, y, out=tmp_path / "b", meta={"image_order": "a fixed permutation"}, **kwargs)
    assert summarize([tmp_path / "a", tmp_path / "a"])["clean"]
    with pytest.raises(ValueError, match="other images.*image order"):
        summarize([tmp_path / "a", tmp_path / "b"])


def test_summarize_refuses_to_join_two_defenses_of_one_model(setup, tmp_path):
    """One model under two defenses (another delta_test): a worst case over both would describe neither."""
    from fsmooth.evaluation.summary import summarize
    model, x, y = setup
    kwargs = dict(protocol="clean", eps=EPS, outer_loops=(1,), budget=tiny_budget(), chunk_size=6, quiet=True,
                  defended_factory=tiny_factory, meta={"checkpoint": "runs/fs/checkpoints/e1"})
    evaluate(model, x, y, out=tmp_path / "a", defense=TINY_DEFENSE, **kwargs)
    other = dataclasses.replace(TINY_DEFENSE, delta=TINY_DEFENSE.delta * 1.5)
    evaluate(model, x, y, out=tmp_path / "b", defense=other, **kwargs)
    assert summarize([tmp_path / "a", tmp_path / "a"])["settings"] == []
    with pytest.raises(ValueError, match=r"defends 'fs' otherwise than .*\ba\b.*defense: .*delta\W"):
        summarize([tmp_path / "a", tmp_path / "b"])
    # the model's default layer named or left out is one defense
    evaluate(model, x, y, out=tmp_path / "named", defense=TINY_DEFENSE, layer=model.default_layer, **kwargs)
    assert summarize([tmp_path / "a", tmp_path / "named"])["models"]["fs"]["reports"][1].endswith("named")
    # two baselines are refused even when the first report has none
    for name, seed in (("std1", 1), ("std2", 2)):
        evaluate(model, x, y, out=tmp_path / name, defense=TINY_DEFENSE, baseline_model=trained_tiny_net(seed=seed),
                 baseline_defense=TINY_BASELINE_DEFENSE, **kwargs)
    with pytest.raises(ValueError, match="baseline_model"):
        summarize([tmp_path / "a", tmp_path / "std1", tmp_path / "std2"])


def test_eot_transfer_attacks_the_first_k_and_scores_its_points_at_the_others():
    specs = {s.run_id: s for s in plan(["eot-transfer"], (8 / 255, 16 / 255), (1, 10), tiny_budget())}
    eot = {s.run_id: s for s in plan(["eot"], (8 / 255, 16 / 255), (1,), tiny_budget())}
    attacks = sorted(r for r, s in specs.items() if s.kind == "attack")
    assert attacks == sorted(r for r, s in eot.items() if s.kind == "attack")  # EOT-PGD through K = 1 only
    for run_id in attacks:  # the eot protocol's own runs: an eot run's finished chunks serve both
        assert specs[run_id].options == eot[run_id].options
    for eps in (8, 16):
        for loss in ("ce", "dlr-targeted"):
            t = specs[f"defended/ol10/eps{eps}/eot-pgd-{loss}-from-ol1"]
            assert (t.kind, t.threat, t.outer_loops) == ("transfer", "transfer", 10)
            assert t.source == f"defended/ol1/eps{eps}/eot-pgd-{loss}"
    assert not any(s.kind == "transfer" for s in plan(["eot-transfer"], (8 / 255,), (1,), tiny_budget()))


def test_eot_transfer_reuses_an_eot_run_and_scores_its_points_at_k(setup, tmp_path):
    """Run in the folder of a finished `eot` evaluation, eot-transfer adds the further K without attacking
    again: the K = 1 chunks stay as they were, and each K = 2 row scores the K = 1 points."""
    model, x, y = setup
    kwargs = dict(eps=EPS, defense=TINY_DEFENSE, budget=tiny_budget(), chunk_size=4, batch_size=4, quiet=True,
                  defended_factory=tiny_factory, seed=5, out=tmp_path)
    evaluate(model, x[:8], y[:8], protocol="eot", outer_loops=(1,), **kwargs)
    chunks = sorted((tmp_path / "state" / "defended_ol1_eps8_eot-pgd-ce").glob("chunk?????.*"))
    before = {p: p.read_bytes() for p in chunks}
    report = evaluate(model, x[:8], y[:8], protocol="eot-transfer", outer_loops=(1, 2), **kwargs)
    assert {p: p.read_bytes() for p in chunks} == before
    runs = {r["run_id"]: r for r in report["runs"]}
    for loss in ("ce", "dlr-targeted"):
        row = runs[f"defended/ol2/eps8/eot-pgd-{loss}-from-ol1"]
        assert row["settings"]["source"] == f"defended/ol1/eps8/eot-pgd-{loss}" and row["n"] == 8
        assert row["perturbation"]["ok"]
    k2 = next(s for s in report["settings"] if s["target"] == "defended" and s["outer_loops"] == 2)
    assert set(k2["columns"]) >= {"eot-pgd-ce-from-ol1", "eot-pgd-dlr-targeted-from-ol1"}
    assert "rescore" in k2
    header = next(line for line in markdown(report).splitlines() if line.startswith("| model | K |"))
    assert "| eot-pgd-ce | eot-pgd-ce-from-ol1 | eot-pgd-dlr-targeted | eot-pgd-dlr-targeted-from-ol1 |" in header


def test_rescoring_falls_back_on_plain_losses_before_the_adaptive_lambdas():
    """An image no attack fooled is re-scored on a cross-entropy point (lambda = 0, EOT-PGD) before the
    adaptive runs whose objective trades cross-entropy for L_F."""
    from fsmooth.evaluation.api import fallback_order

    specs = plan(["adaptive", "eot"], (8 / 255,), (1,), tiny_budget().replace(lambdas=(1.0,)))
    order = fallback_order([s for s in specs if s.kind == "attack"])
    assert order[:3] == ["defended/ol1/eps8/adaptive+0", "defended/ol1/eps8/eot-pgd-ce",
                         "defended/ol1/eps8/eot-pgd-dlr-targeted"]
    assert set(order[3:]) == {"defended/ol1/eps8/adaptive-1", "defended/ol1/eps8/adaptive+1"}
