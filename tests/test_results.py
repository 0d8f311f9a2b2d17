"""results/: the committed tables are what the committed reports make, and every accuracy interval quoted by
hand comes from a committed report (``python results/make_results.py --check``)."""
from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import pytest

from fsmooth.evaluation.report import markdown
from fsmooth.evaluation.summary import summarize

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def make_results():
    spec = importlib.util.spec_from_file_location("make_results", ROOT / "results" / "make_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(module) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the partial reports say they are partial
        return module.check()


def test_committed_results_are_current_and_every_quoted_interval_has_a_report(make_results):
    assert _check(make_results) == []


@pytest.mark.parametrize("prose, missing", [
    ("81.3% [78.8, 83.6] and 0.5% [0.1, 2.8]", []),            # rounded from the reports' two decimals
    ("81.25 [78.80, 83.60]", []),                                # as the report writes it
    ("81.3% [78.8, 83.7]", ["81.3% [78.8, 83.7]"]),              # one bound off by a tenth
    ("82.3% [78.8, 83.6]", ["82.3% [78.8, 83.6]"]),              # the accuracy off by a point
    ("2.5% [1.1, 5.7] in all runs", ["2.5% [1.1, 5.7]"]),        # worked out by hand: in no report
    ("0.5% [0.1, 2.8] (n = 200), 81% [79, 84]", []),           # fewer decimals in prose
    ("no intervals here: 85.54% and [1, 2]", []),
    ("81.3%\n  [78.8, 83.6], wrapped", []),                  # a quote wrapped across lines is checked
    ("81.3%\n  [99.9, 83.6]", ["81.3% [99.9, 83.6]"]),
    ("81.3 % [78.8 , 83.7]", ["81.3% [78.8, 83.7]"]),         # spaced out
    ("81.26 [78.80, 83.60]", ["81.26% [78.80, 83.60]"]),      # two decimals: the report's exactly
])
def test_unsourced_finds_each_interval_no_report_states(make_results, prose, missing):
    evidence = "| 81.25 [78.80, 83.60] | 0.50 [0.09, 2.78] |"
    assert make_results.unsourced(prose, evidence) == missing


@pytest.fixture
def copied(make_results, tmp_path, monkeypatch):
    """The module pointed at a copy of the repository's results/ and README.md."""
    shutil.copytree(ROOT / "results", tmp_path / "results", ignore=shutil.ignore_patterns("state"))
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    monkeypatch.setattr(make_results, "ROOT", tmp_path)
    monkeypatch.setattr(make_results, "RESULTS", tmp_path / "results")
    monkeypatch.chdir(tmp_path)  # main() changes to ROOT; monkeypatch changes back
    assert _check(make_results) == []
    return tmp_path


def test_check_fails_on_a_stale_table(make_results, copied):
    summary = copied / "results" / "summary.md"
    summary.write_text(summary.read_text().replace("0.5 [0.1, 2.8]", "0.6 [0.1, 2.8]", 1))
    assert _check(make_results) == ["results/summary.md is not what the committed reports make: "
                                    "run python results/make_results.py"]


def test_check_fails_on_a_report_md_not_rendered_from_its_json(make_results, copied):
    md = copied / "results" / "eval" / "fs-autoattack-mixed" / "report.md"
    md.write_text(md.read_text().replace("0.50 [0.09, 2.78]", "0.60 [0.09, 2.78]"))
    assert _check(make_results) == ["results/eval/fs-autoattack-mixed/report.md is not what the committed "
                                    "reports make: run python results/make_results.py"]


def test_check_fails_on_a_hand_written_interval_no_report_has(make_results, copied):
    plan = copied / "results" / "PLAN.md"
    plan.write_text(plan.read_text() + "\nAn invented result: 12.3% [4.5, 67.8].\n")
    assert _check(make_results) == ["results/PLAN.md: 12.3% [4.5, 67.8] is in no committed report"]


def test_make_results_writes_what_check_then_accepts(make_results, copied):
    (copied / "results" / "summary.md").write_text("stale\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert make_results.main([]) == 0
    assert _check(make_results) == []


def test_a_partial_report_counts_beside_the_finished_one_only_when_written_after_it(make_results, copied):
    """A finished run extended later (say eps 16 after eps 8) counts by both its reports; a partial report read
    before its run finished, or on fewer images, is left out; a run with no finished report counts by its
    partial one."""
    run = Path("results") / "eval" / "fs-eot-mixed"                   # holds both reports
    shutil.copy(copied / run / "report.json", copied / run / "partial" / "report.json")

    def finished(path, when):
        report = json.loads((copied / path / "report.json").read_text())
        report["info"]["finished"] = when
        (copied / path / "report.json").write_text(json.dumps(report))

    finished(run, "2026-11-27T12:00:00+00:00")
    finished(run / "partial", "2026-11-27T22:00:00+00:00")
    found = make_results._reports(ten_classes=True)
    assert run in found and run / "partial" in found
    finished(run / "partial", "2026-11-27T10:00:00+00:00")
    found = make_results._reports(ten_classes=True)
    assert run in found and run / "partial" not in found
    # Written before the finished report but holding a setting it lacks (eps 32 beside re-scored ones): kept.
    report = json.loads((copied / run / "partial" / "report.json").read_text())
    extra = copy.deepcopy(report["settings"][0])
    extra["eps_255"], extra["eps"] = 32.0, 32 / 255
    report["settings"].append(extra)
    (copied / run / "partial" / "report.json").write_text(json.dumps(report))
    assert run / "partial" in make_results._reports(ten_classes=True)
    report["settings"].pop()
    (copied / run / "partial" / "report.json").write_text(json.dumps(report))
    # Written after it but on fewer images (the first chunks of an extension): the finished rows would shrink.
    finished(run / "partial", "2026-11-27T22:00:00+00:00")
    report = json.loads((copied / run / "partial" / "report.json").read_text())
    report["info"]["n"] = 20
    (copied / run / "partial" / "report.json").write_text(json.dumps(report))
    assert run / "partial" not in make_results._reports(ten_classes=True)
    (copied / run / "report.json").unlink()
    found = make_results._reports(ten_classes=True)
    assert run not in found and run / "partial" in found


def test_a_partial_report_names_the_runs_it_did_not_select(make_results, copied):
    """A partial report made with fewer eps than its evaluation (to show a run that is ahead at its own n) names
    the runs whose state it left aside; the generated list of unfinished reports repeats them."""
    run = Path("results") / "eval" / "fs-square-mixed"
    (copied / run / "report.json").unlink(missing_ok=True)  # a run with no finished report counts by its partial one
    partial = run / "partial"
    path = copied / partial / "report.json"
    report = json.loads(path.read_text())
    report["info"]["partial"]["not_selected"] = ["defended_ol1_eps32_square"]
    path.write_text(json.dumps(report))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert make_results.main([]) == 0
    readme = (copied / "results" / "README.md").read_text()
    assert f"`{partial}` (other runs in its state, not selected: defended_ol1_eps32_square)" in readme
    assert "Not selected by this command, though the state holds their work (select them to report them): " \
        "`defended_ol1_eps32_square`." in (copied / partial / "report.md").read_text()


def test_a_report_whose_device_text_named_torch_names_it_once(tmp_path):
    """Reports written before 2026-11-27 carry torch's version in their device text too (fs-rand-mixed's did
    until it was re-scored on 2026-11-28): a copy of it, given that text back."""
    folder = tmp_path / "fs-rand-mixed"
    folder.mkdir()
    for name in ("report.json", "per_image.safetensors"):
        shutil.copy(ROOT / "results" / "eval" / "fs-rand-mixed" / name, folder / name)
    report = json.loads((folder / "report.json").read_text())
    environment = report["info"]["environment"]
    if "torch" not in environment["device"]:
        environment["device"] += f", torch {environment['torch']}"
    for run in report["runs"]:
        run.pop("machines", None)  # as those reports were: the device column falls back on the report's machine
    (folder / "report.json").write_text(json.dumps(report))
    header = markdown(report).splitlines()[2]
    assert header.count("torch ") == 1 and "(AVX512, 1 threads), torch 2.14.1" in header
    devices = {c["device"] for c in summarize([folder])["clean"]}
    assert devices == {"Intel(R) Xeon(R) Processor (AVX512, 1 threads)"}   # the cost table's device column


def test_the_cost_tables_device_is_where_the_chunks_ran_not_where_the_report_was_written():
    """std-row7-gpu's partial report was rendered on a CPU machine from chunks computed on an H100: its times
    are the H100's, and so must its device column be."""
    folder = ROOT / "results" / "eval" / "std-row7-gpu" / "partial"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a partial report says so
        clean = summarize([folder])["clean"]
    assert json.loads((folder / "report.json").read_text())["info"]["environment"]["machine"]["gpu"] is None
    assert {c["device"] for c in clean} == {"NVIDIA H100 80GB HBM3 (AVX512, 1 threads)"}


@pytest.mark.parametrize("order", [1, -1])
def test_an_attack_in_two_reports_shows_the_stronger_run_before_the_larger(order):
    """fs-adaptive-gpu (n = 1000) attacked only the images its first defended pass got right and returned the
    others clean; fs-adaptive-mixed (n = 100) attacked every image and kept its highest-loss points. The column
    is the stronger attack's, whichever report comes first; both still count in the worst case."""
    folders = [ROOT / "results" / "eval" / run for run in ("fs-adaptive-gpu", "fs-adaptive-mixed")][::order]
    summary = summarize(folders)
    setting = next(s for s in summary["settings"] if s["target"] == "defended" and s["eps_255"] == 8)
    for lam in ("-10", "-1", "+0", "+1", "+10"):
        column = setting["columns"][f"adaptive{lam}"]
        assert column["n"] == 100 and column["report"].endswith("fs-adaptive-mixed"), (lam, column)
    assert len(summary["adaptive"]) == 10  # Table 3 lists both
    assert setting["worst_case"]["n"] == 100 and len(setting["reports"]) == 2  # joined on the images both have
