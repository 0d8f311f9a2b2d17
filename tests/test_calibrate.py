"""fsmooth.calibrate: the delta_test rule, the beta/delta_test search, and their storage in the checkpoint."""
import copy
import math
import warnings

import pytest
import torch

from fsmooth.calibrate import (DELTA_RATIO, CalibrationTarget, CalibrationWarning, calibrate, calibrate_checkpoint,
                               calibrate_defense, clean_feature_losses, feature_size, scaled_beta, suggest_delta_test)
from fsmooth.defense import ActiveDefense, DefendedClassifier, DefenseConfig, defend
from fsmooth.checkpoint import load_model, save_checkpoint
from fsmooth.models import WideResNet
from fsmooth.reference import feature_loss_reference


def tiny_model():
    torch.manual_seed(0)
    return WideResNet(10, 1).eval()


def test_clean_losses_match_float64_reference():
    model = tiny_model()
    images = torch.randint(0, 256, (7, 3, 11, 13), dtype=torch.uint8)
    losses = clean_feature_losses(model, images, batch_size=3)
    with torch.no_grad():
        net = model.double()
        x = images.double() / 255
        ref = feature_loss_reference(net.block1(net.conv1(net.normalize(x))))
    assert losses.shape == (7,) and losses.dtype == torch.float32
    assert ((losses.double() - ref).norm() / ref.norm()) < 1e-5


def test_rule_is_the_papers_ratio_of_the_mean():
    losses = torch.tensor([0.0130, 0.0135, 0.0140])
    assert suggest_delta_test(losses) == pytest.approx(round(DELTA_RATIO * 0.0135, 6))
    assert suggest_delta_test(losses) == 0.01242  # 4 significant digits; the paper uses 0.0124
    value = suggest_delta_test(torch.rand(50) + 0.5)
    assert math.isclose(value, float(f"{value:.4g}"))
    with pytest.raises(ValueError, match="empty"):
        suggest_delta_test(torch.zeros(0))
    with pytest.raises(ValueError, match="NaN"):
        suggest_delta_test(torch.tensor([0.1, float("nan")]))


def test_report_quantiles_and_checkpoint_storage(tmp_path):
    model = tiny_model()
    images = torch.randint(0, 256, (20, 3, 16, 16), dtype=torch.uint8)
    report = calibrate(model, images, batch_size=8)
    with torch.no_grad():  # an independent float64 transcription, not the function under test
        net = copy.deepcopy(model).double()
        f = net.block1(net.conv1(net.normalize(images.double() / 255))).flatten(1)
        losses = (f - f.mean(1, keepdim=True)).abs().mean(1)
    assert report["n"] == 20 and report["mean"] == pytest.approx(float(losses.mean()), rel=1e-5)
    assert report["std"] == pytest.approx(float(losses.std()), rel=1e-4)
    assert report["min"] == pytest.approx(float(losses.min()), rel=1e-5)
    assert report["max"] == pytest.approx(float(losses.max()), rel=1e-5)
    levels = torch.tensor([float(k) for k in report["quantiles"]], dtype=torch.float64)
    assert list(report["quantiles"].values()) == pytest.approx(torch.quantile(losses, levels).tolist(), rel=1e-5)
    assert report["delta_test"] == pytest.approx(DELTA_RATIO * float(losses.mean()), rel=1e-3)  # 4 digits
    assert report["fraction_above"] == pytest.approx(float((losses > report["delta_test"]).double().mean()))
    save_checkpoint(tmp_path / "ck", model, {"arch": "wrn-10-1", "layer": "block1"})
    stored = calibrate_checkpoint(tmp_path / "ck", images=images, write=True, search=False)
    loaded, meta = load_model(tmp_path / "ck")
    assert meta["delta_test"] == stored["delta_test"] == report["delta_test"]
    assert loaded.defense_delta == report["delta_test"] and meta["calibration"]["n"] == 20
    dry = calibrate_checkpoint(tmp_path / "ck", images=images[:5], write=False, search=False)
    assert load_model(tmp_path / "ck")[1]["delta_test"] == report["delta_test"] != dry["delta_test"]


# --------------------------------------------------------------------------- beta and delta_test search


def smooth_images(n, size=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.avg_pool2d(torch.rand(n, 3, size, size, generator=g), 3, 1, 1)


def test_beta_scales_with_the_layer_size_across_widths():
    assert scaled_beta(160 * 32 * 32) == 80.0  # the paper's WRN-28-10 block1
    sizes = {}
    for width in (1, 2):
        torch.manual_seed(0)
        model = WideResNet(10, width).eval()
        sizes[width] = feature_size(model, None, torch.rand(3, 32, 32))
    assert sizes == {1: 16 * 32 * 32, 2: 32 * 32 * 32}
    assert scaled_beta(sizes[1]) == 8.0 and scaled_beta(sizes[2]) == 16.0
    assert scaled_beta(160 * 32 * 32, 0.0124) == pytest.approx(80.0)  # the paper's own threshold
    assert scaled_beta(sizes[1], 1.24) == pytest.approx(0.08)          # 100x larger features: 100x smaller step
    with pytest.raises(ValueError, match="size"):
        scaled_beta(0)
    for bad in (0.0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="delta_test"):
            scaled_beta(16, bad)


class _Scale(torch.nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x):
        return x * self.s


def test_search_start_is_invariant_to_the_feature_magnitude():
    """Features s times larger (block1's output times s) must start the search at a step s times smaller,
    which makes the descent the same: the same iterations and the same defended inputs."""
    model = tiny_model()
    scaled = copy.deepcopy(model)
    scaled.block1 = torch.nn.Sequential(scaled.block1, _Scale(100.0))
    x = smooth_images(4, size=8)
    target = CalibrationTarget(accuracy_tolerance=1, max_unconverged=1, min_median_iterations=0,
                               max_median_linf=1)
    reports = []
    for m in (model, scaled):
        with torch.no_grad():
            y = m(x).argmax(1)
        reports.append(calibrate_defense(m, x, y, n=None, max_iters=40, target=target, beta_factors=(1,),
                                         delta_ratios=(0.92,)))
    plain, big = reports
    assert big["start"]["delta"] == pytest.approx(100 * plain["start"]["delta"], rel=1e-6)
    assert big["start"]["beta"] == pytest.approx(plain["start"]["beta"] / 100, rel=1e-6)
    a, b = plain["chosen"], big["chosen"]
    assert a["iterations"]["median"] >= 5  # a real descent, not a one-step exit
    for key in ("median", "q10", "q90"):
        assert abs(a["iterations"][key] - b["iterations"][key]) <= 1
    assert b["linf"]["median"] == pytest.approx(a["linf"]["median"], rel=1e-3)


def test_search_picks_the_largest_feasible_step_at_the_preferred_ratio():
    model = tiny_model()
    x = smooth_images(8, size=10)
    with torch.no_grad():
        y = model(x).argmax(1)
    target = CalibrationTarget(accuracy_tolerance=0.25, max_unconverged=0.15, min_median_iterations=8)
    # Large factors first, so that the largest steps overshoot (too few iterations) and the search must go on.
    report = calibrate_defense(model, x, y, n=None, max_iters=60, target=target, beta_factors=(64, 16, 4, 1, 0.25),
                               delta_ratios=(0.92, 0.85))
    chosen = report["chosen"]
    assert report["satisfied"] and chosen["feasible"] and target.violations(chosen) == {}
    assert chosen["iterations"]["median"] >= 8 and chosen["unconverged"] <= 0.15
    assert chosen["bare_accuracy"] - chosen["accuracy"] <= 0.25 and chosen["linf"]["median"] <= 32
    assert (report["beta"], report["delta_test"], report["sigma"]) == (chosen["beta"], chosen["delta"], 0.075)
    # The starting point is the paper's rule, scaled: 0.92 x mean clean L_F, 80 x (16 x 10 x 10) / 163840 x
    # (0.0124 / that delta_test).
    start_delta = suggest_delta_test(clean_feature_losses(model, x))
    assert report["start"]["delta"] == start_delta
    assert report["start"]["beta"] == pytest.approx(80 * 16 * 10 * 10 / 163840 * 0.0124 / start_delta)
    assert chosen["delta"] == suggest_delta_test(clean_feature_losses(model, x), chosen["delta_ratio"])
    # Every larger step at the same ratio was tried and missed; the preferred ratio came first.
    same = [p for p in report["points"] if p["delta_ratio"] == chosen["delta_ratio"]]
    assert [p["beta"] for p in same] == sorted((p["beta"] for p in same), reverse=True)
    assert len(same) >= 2 and same[-1] is chosen and not any(p["feasible"] for p in same[:-1])
    earlier = [p for p in report["points"] if p["delta_ratio"] > chosen["delta_ratio"]]
    assert not any(p["feasible"] for p in earlier)
    # Iterations grow as the step shrinks (the search's premise).
    medians = [p["iterations"]["median"] for p in same]
    assert medians == sorted(medians)


def test_search_says_so_when_no_point_meets_the_target():
    model = tiny_model()
    x = smooth_images(6)
    with torch.no_grad():
        y = model(x).argmax(1)
    target = CalibrationTarget(min_median_iterations=10_000)  # more than the cap allows
    with pytest.warns(CalibrationWarning, match="no point met every constraint"):
        report = calibrate_defense(model, x, y, n=None, max_iters=10, target=target, beta_factors=(1, 0.5),
                                   delta_ratios=(0.92,))
    assert not report["satisfied"] and not any(p["feasible"] for p in report["points"])
    best = min(sum(p["violations"].values()) for p in report["points"])
    assert sum(report["chosen"]["violations"].values()) == best and "iterations" in report["chosen"]["violations"]
    assert "no point met" in report["why"]


def test_search_rejects_bad_arguments():
    model = tiny_model()
    x, y = smooth_images(2), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="labels"):
        calibrate_defense(model, x, y[:1])
    with pytest.raises(ValueError, match="beta_factors"):
        calibrate_defense(model, x, y, beta_factors=())
    with pytest.raises(ValueError, match="delta_ratios"):
        calibrate_defense(model, x, y, delta_ratios=(1.5,))
    with pytest.raises(ValueError, match="max_iters"):
        calibrate_defense(model, x, y, max_iters=0)
    with pytest.raises(ValueError, match="n must"):
        calibrate_defense(model, x, y, n=0)
    with pytest.raises(ValueError, match="batch_size"):
        calibrate_defense(model, x, y, batch_size=0)
    with pytest.raises(ValueError, match="min_median_iterations"):
        CalibrationTarget(min_median_iterations=-1)
    with pytest.raises(TypeError, match="target"):
        calibrate_defense(model, x, y, target={"min_median_iterations": 3})
    with pytest.raises(ValueError, match="device is meta but the model is on cpu"):  # the model is not moved
        calibrate_defense(model, x, y, device="meta")
    assert calibrate_defense(model, x, y, device="cpu", beta_factors=(1.0,), delta_ratios=(0.9,), max_iters=2)


@pytest.fixture
def calibrated(tmp_path):
    """A checkpoint calibrated by the search, loaded back."""
    model = tiny_model()
    x = smooth_images(8)
    with torch.no_grad():
        y = model(x).argmax(1)
    save_checkpoint(tmp_path / "ck", model, {"arch": "wrn-10-1", "layer": "block1"})
    target = CalibrationTarget(accuracy_tolerance=1, max_unconverged=1, min_median_iterations=1, max_median_linf=1)
    report = calibrate_checkpoint(tmp_path / "ck", images=(x * 255).round().to(torch.uint8), labels=y,
                                  max_iters=20, target=target, beta_factors=(0.5,), delta_ratios=(0.85,))
    loaded, meta = load_model(tmp_path / "ck")
    return loaded, meta, report


def test_search_result_round_trips_through_the_metadata(calibrated):
    loaded, meta, report = calibrated
    expected = {"sigma": 0.075, "beta": report["beta"], "delta": report["delta_test"]}
    assert report["beta"] == pytest.approx(0.5 * 80 * 16 * 12 * 12 / 163840 * 0.0124 / report["start"]["delta"])
    assert meta["defense"] == expected and meta["delta_test"] == report["delta_test"]
    assert meta["calibration"]["points"][0]["n"] == 8 and meta["calibration"]["split"] == "train"
    assert loaded.defense_defaults == expected
    assert DefenseConfig.for_model(loaded) == DefenseConfig(sigma=0.075, beta=report["beta"],
                                                            delta=report["delta_test"])


def test_every_entry_point_uses_the_calibration_and_explicit_arguments_win(calibrated):
    from fsmooth.demo import _defense_config as demo_config
    from fsmooth.evaluation.api import _defense_config as eval_config
    loaded, meta, report = calibrated
    beta, delta = report["beta"], report["delta_test"]
    assert beta != 80.0 and delta != 0.0124
    assert ActiveDefense(loaded).config.beta == beta and ActiveDefense(loaded).config.delta == delta
    assert DefendedClassifier(loaded).config == DefenseConfig.for_model(loaded)
    assert demo_config(loaded, 7) == DefenseConfig(beta=beta, delta=delta, max_iters=7)
    assert eval_config(None, loaded) == DefenseConfig(beta=beta, delta=delta)
    # defend(): the calibrated setting by default, an explicit beta otherwise (same noise both times).
    x = smooth_images(3)
    runs = {}
    for name, kwargs in (("default", {}), ("calibrated", {"beta": beta, "delta": delta}),
                         ("explicit", {"beta": beta * 4})):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            runs[name] = defend(loaded, x, generator=torch.Generator().manual_seed(0), max_iters=20,
                                return_info=True, engine="eager", **kwargs)
    assert torch.equal(runs["default"].inputs, runs["calibrated"].inputs)
    assert not torch.equal(runs["default"].inputs, runs["explicit"].inputs)
    # Explicit settings override; presets keep the paper's values; unknown fields are refused.
    assert DefenseConfig.for_model(loaded, beta=3.0, sigma=0.0).beta == 3.0
    assert DefenseConfig.for_model(loaded, beta=3.0, sigma=0.0).sigma == 0.0
    assert ActiveDefense(loaded, config=DefenseConfig.preset("cifar10")).config.beta == 80.0
    assert DefenseConfig.preset("cifar10").delta == 0.0124
    with pytest.raises(TypeError, match="unknown DefenseConfig field"):
        DefenseConfig.for_model(loaded, step=3.0)
    # An uncalibrated model gets the paper's values.
    assert DefenseConfig.for_model(tiny_model()) == DefenseConfig()


def test_noise_only_accuracy_uses_the_noise_every_point_starts_from():
    model = tiny_model()
    x = smooth_images(6, size=10)
    with torch.no_grad():
        y = model(x).argmax(1)
    with pytest.warns(CalibrationWarning):  # 3 iterations cannot reach the default target's median of 100
        report = calibrate_defense(model, x, y, n=None, max_iters=3, beta_factors=(1,), delta_ratios=(0.92,),
                                   seed=6, sigma=0.3, batch_size=4)
    generator = torch.Generator().manual_seed(6)
    noisy = torch.cat([xb + (torch.rand(xb.shape, generator=generator) * 2 - 1) * 0.3 for xb in x.split(4)])
    with torch.no_grad():
        expected = (model(noisy).argmax(1) == y).double().mean().item()
    assert 0 < expected < 1  # this draw flips some predictions: another draw would give another value
    assert report["bare_accuracy"] == 1.0 and report["noise_accuracy"] == expected
