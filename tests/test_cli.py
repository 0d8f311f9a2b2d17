"""The ``fsmooth`` command line: a smoke test of every subcommand on tiny inputs."""
import importlib.util
import json
import pickle
import sys
import warnings

import numpy as np
import pytest
import torch

from fsmooth.cli import main


def _write_cifar10(root, per_batch=4, n_test=6):
    """A tiny cifar-10-batches-py folder in the original pickle format."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        entry = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data folder, run folder) of a 1-epoch wrn-10-1 run made by ``fsmooth train``."""
    root = tmp_path_factory.mktemp("cli")
    mp = pytest.MonkeyPatch()
    mp.setenv("FSMOOTH_CACHE", str(root / "cache"))
    data = _write_cifar10(root / "data")
    code = main(["train", "--out", str(root / "run"), "--data", str(data), "--arch", "wrn-10-1", "--epochs", "1",
                 "--batch-size", "8", "--quiet"])
    assert code == 0
    yield data, root / "run"
    mp.undo()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FSMOOTH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FSMOOTH_DATA", raising=False)


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in ("train", "calibrate", "plot-log", "demo", "defend", "eval"):
        assert name in out


def test_train_writes_log_and_checkpoint(trained):
    _, run = trained
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["test_n"] == 6
    meta = json.loads((run / "checkpoints" / "epoch-0001" / "meta.json").read_text())
    assert meta["command"].startswith("fsmooth train --out") and meta["arch"] == "wrn-10-1"


def test_verbose_goes_before_or_after_the_subcommand():
    from fsmooth.cli import build_parser
    parser = build_parser()
    assert parser.parse_args(["-v", "demo"]).verbose and parser.parse_args(["demo", "-v"]).verbose
    assert parser.parse_args(["summarize", "x", "--out", "y", "--verbose"]).verbose
    assert not parser.parse_args(["demo"]).verbose


def test_bad_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--out", "x", "--delta", "abc"])
    assert info.value.code == 2 and "--delta" in capsys.readouterr().err
    assert main(["calibrate", "/nonexistent/checkpoint"]) == 2
    for option, value in (("--min-median-iters", "-1"), ("--min-median-iters", "1.5"),
                          ("--max-median-linf", "300"), ("--max-median-linf", "nan")):
        with pytest.raises(SystemExit) as info:  # refused by the parser, before any model is loaded
            main(["calibrate", "/nonexistent/checkpoint", option, value])
        assert info.value.code == 2 and option in capsys.readouterr().err


def test_calibrate_then_plot(trained, tmp_path, capsys):
    data, run = trained
    assert main(["calibrate", str(run), "--data", str(data), "--delta-only"]) == 0
    out = capsys.readouterr().out
    assert "suggested delta_test" in out and "q50=" in out
    meta = json.loads((run / "checkpoints" / "epoch-0001" / "meta.json").read_text())
    assert f"{meta['delta_test']:.4f}" in out and meta["defense"] == {"delta": meta["delta_test"]}
    figure = tmp_path / "search.png"
    assert main(["calibrate", str(run), "--data", str(data), "--max-iters", "12", "--beta-factors", "1,0.5",
                 "--delta-ratios", "0.92", "--min-median-iters", "2", "--accuracy-tolerance", "1",
                 "--max-unconverged", "1", "--max-median-linf", "255", "--figure", str(figure), "--quiet"]) == 0
    out = capsys.readouterr().out
    meta = json.loads((run / "checkpoints" / "epoch-0001" / "meta.json").read_text())
    search = meta["calibration"]
    assert search["split"] == "train" and search["n"] == 20 and search["satisfied"]
    assert meta["defense"] == {"sigma": 0.075, "beta": search["beta"], "delta": meta["delta_test"]}
    # wrn-10-1's block1 (16 x 32 x 32), and the feature magnitude measured by delta_test against 0.0124
    assert search["start"]["beta"] == pytest.approx(80 * 16 * 32 * 32 / 163840 * 0.0124 / search["start"]["delta"])
    assert f"beta = {search['beta']:.4g}, delta_test = {meta['delta_test']:.4g}" in out and "why:" in out
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png = tmp_path / "curves.png"
    assert main(["plot-log", str(run / "log.jsonl"), "-o", str(png), "--delta", "0.02"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_and_defend(trained, tmp_path, capsys):
    from PIL import Image
    data, run = trained
    png = tmp_path / "demo.png"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["demo", "--model", str(run), "--data", str(data), "-n", "3", "--pgd-steps", "1",
                     "--max-iters", "3", "--eps", "16", "-o", str(png), "--quiet"]) == 0
    # 3 iterations converge nothing: the table counts it, and no warning is printed (the figure's run included)
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []
    out = capsys.readouterr().out
    assert "clean accuracy" in out and "PGD-1 accuracy" in out and "defense iterations" in out
    assert "eps 16/255" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    files = []
    for i, size in enumerate((32, 40)):
        files.append(tmp_path / f"img{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(files[-1])
    assert main(["defend", *map(str, files), "--model", str(run), "--max-iters", "3", "--outer-loops", "2"]) == 0
    out = capsys.readouterr().out
    assert "img0.png" in out and "img1.png" in out and "Active Defense" in out
    assert main(["defend", str(tmp_path / "missing.png"), "--model", str(run)]) == 2


def test_demo_eps_is_in_255ths_and_empty_data_is_refused(trained, monkeypatch, capsys, tmp_path):
    _, run = trained
    with pytest.raises(SystemExit) as info:  # 8/255 written as a fraction, as eval would refuse it
        main(["demo", "--model", str(run), "--eps", "0.03"])
    assert info.value.code == 2 and "--eps" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # an empty --data would have scanned the working folder
    assert main(["demo", "--model", str(run), "--data", "", "-n", "2", "--quiet"]) == 2
    assert "empty" in capsys.readouterr().err


def test_demo_without_data_says_how_to_get_it(trained, monkeypatch, capsys):
    import torchvision
    _, run = trained

    def offline(*args, **kwargs):
        raise RuntimeError("no internet")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.setenv("FSMOOTH_DATA", "")  # set but empty counts as unset
    assert main(["demo", "--model", str(run), "-n", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "FSMOOTH_DATA" in err


def test_eval_is_registered_or_explained(monkeypatch, capsys):
    if importlib.util.find_spec("fsmooth.evaluation.cli") is not None:
        with pytest.raises(SystemExit) as info:
            main(["eval", "--help"])
        assert info.value.code == 0 and "--checkpoint" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "fsmooth.evaluation.cli", None)  # as if issue 5 were not installed
    assert main(["eval"]) == 2
    assert "fsmooth.evaluation.cli" in capsys.readouterr().err


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("fsmooth "), err
    for needle in needles:
        assert needle in err, err
    return err


def test_train_refuses_to_replace_or_mix_runs(trained, capsys):
    data, run = trained
    log = (run / "log.jsonl").read_bytes()
    common = ["train", "--out", str(run), "--data", str(data), "--arch", "wrn-10-1", "--epochs", "1",
              "--batch-size", "8", "--quiet"]
    assert main(common) == 2
    _one_line_error(capsys, "already holds a run", "--resume", "--overwrite")
    assert main(common + ["--resume", "--lr", "0.2", "--batch-size", "4"]) == 2
    _one_line_error(capsys, "batch_size 8 -> 4", "lr 0.1 -> 0.2")
    assert (run / "log.jsonl").read_bytes() == log
    assert main(common + ["--resume"]) == 0  # the recorded settings resume (here: nothing left to do)
    assert (run / "log.jsonl").read_bytes() == log


@pytest.mark.parametrize("meta, needle", [
    ([1, 2], "must hold a JSON object, got a list"),
    ("wrn-10-1", "must hold a JSON object, got a str"),
    ({"model_config": {"depth": "16", "width": 1, "num_classes": 10}}, "'depth' must be an integer, got '16'"),
])
def test_wrong_typed_metadata_is_a_one_line_error(tmp_path, capsys, meta, needle):
    from PIL import Image
    from fsmooth.checkpoint import save_checkpoint
    from fsmooth.models import WideResNet
    save_checkpoint(tmp_path / "ck", WideResNet(10, 1), {"arch": "wrn-10-1"})
    (tmp_path / "ck" / "meta.json").write_text(json.dumps(meta))
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    assert main(["defend", str(tmp_path / "x.png"), "--model", str(tmp_path / "ck")]) == 2
    _one_line_error(capsys, needle)


def test_unusable_out_and_device_are_one_line_errors(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["train", "--out", str(blocker / "run"), "--data", str(tmp_path), "--arch", "wrn-10-1"]) == 2
    _one_line_error(capsys, "is a file", str(blocker))
    assert not (blocker.parent / "cache").exists()
    if not torch.cuda.is_available():
        assert main(["train", "--out", str(tmp_path / "run"), "--device", "cuda", "--arch", "wrn-10-1"]) == 2
        _one_line_error(capsys, "--device", "CUDA is not available")
        assert not (tmp_path / "run").exists()
    assert main(["eval", "--checkpoint", str(tmp_path / "missing"), "--out", str(blocker / "eval")]) == 2
    _one_line_error(capsys, "--out", "is a file")  # checked before the (missing) checkpoint is opened


@pytest.mark.parametrize("flag, value", [("--pgd-steps", "-1"), ("--rescore-runs", "-2"), ("--apgd-iter", "0"),
                                         ("--n", "0"), ("--outer-loops", "0"), ("--chunk-size", "-5"),
                                         ("--lambdas", "-1"), ("--sweep-eps", "0")])
def test_eval_options_are_validated_before_any_work(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as info:  # argparse: usage error, nothing loaded or run
        main(["eval", "--checkpoint", str(tmp_path / "missing"), "--budget", "tiny", flag, value])
    assert info.value.code == 2 and flag in capsys.readouterr().err


def test_budget_rejects_impossible_values():
    from fsmooth.evaluation import Budget
    with pytest.raises(ValueError, match="pgd_steps"):
        Budget(pgd_steps=-1)
    with pytest.raises(ValueError, match="rescore_runs"):
        Budget().replace(rescore_runs=-2)
    with pytest.raises(ValueError, match="eps_sweep"):
        Budget(eps_sweep=(8.0,))  # 1/255 units where [0, 1] units are expected
    assert Budget(rescore_runs=0).rescore_runs == 0
