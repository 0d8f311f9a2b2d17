"""fsmooth.calibrate: clean L_F distribution, the delta_test rule, and its storage in the checkpoint."""
import math

import pytest
import torch

from fsmooth.calibrate import DELTA_RATIO, calibrate, calibrate_checkpoint, clean_feature_losses, suggest_delta_test
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
    losses = clean_feature_losses(model, images)
    assert report["n"] == 20 and report["mean"] == pytest.approx(losses.double().mean().item())
    q = list(report["quantiles"].values())
    assert q == sorted(q) and report["min"] <= q[0] and q[-1] <= report["max"]
    assert report["fraction_above"] == pytest.approx((losses > report["delta_test"]).double().mean().item())
    save_checkpoint(tmp_path / "ck", model, {"arch": "wrn-10-1", "layer": "block1"})
    stored = calibrate_checkpoint(tmp_path / "ck", images=images, write=True)
    loaded, meta = load_model(tmp_path / "ck")
    assert meta["delta_test"] == stored["delta_test"] == report["delta_test"]
    assert loaded.defense_delta == report["delta_test"] and meta["calibration"]["n"] == 20
    dry = calibrate_checkpoint(tmp_path / "ck", images=images[:5], write=False)
    assert load_model(tmp_path / "ck")[1]["delta_test"] == report["delta_test"] != dry["delta_test"]
