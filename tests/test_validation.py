"""Image arguments: one check for every entry point that takes images (calibration, evaluation)."""
import pytest
import torch

from fsmooth._validation import as_unit_images
from fsmooth.calibrate import clean_feature_losses, feature_size
from fsmooth.evaluation.api import _as_images
from fsmooth.models import WideResNet


def test_uint8_is_scaled_and_float_in_range_passes_unchanged():
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (3, 3, 5, 7), dtype=torch.uint8, generator=g)
    torch.testing.assert_close(as_unit_images(u8), u8.double().div(255).float())
    x = torch.rand(1, 3, 4, 4, generator=g, dtype=torch.float64)
    out = as_unit_images(x)
    assert out.dtype == torch.float32 and torch.equal(out, x.float())
    assert as_unit_images(torch.empty(0, 3, 4, 4)).shape == (0, 3, 4, 4)


@pytest.mark.parametrize("bad,error,match", [
    (torch.randint(0, 256, (2, 3, 4, 4)), TypeError, "images must be uint8 .* got torch.int64"),
    (torch.rand(2, 3, 4, 4) * 2, ValueError, r"images must lie in \[0, 1\]"),
    (torch.full((2, 3, 4, 4), float("nan")), ValueError, "NaN"),
    (torch.rand(3, 4, 4), ValueError, r"\(N, C, H, W\)"),
    ([[0.5]], TypeError, "torch.Tensor"),
])
def test_bad_images_are_refused_by_every_entry_point(bad, error, match):
    with pytest.raises(error, match=match):
        as_unit_images(bad)
    model = WideResNet(10, 1).eval()
    if isinstance(bad, torch.Tensor) and bad.dim() == 4:
        with pytest.raises(error, match=match):  # integer 0-255 images were once taken as floats here
            clean_feature_losses(model, bad)
        with pytest.raises(error, match=match.replace("images", "sample")):
            feature_size(model, "block1", bad)
    if not isinstance(bad, torch.Tensor):  # a list is a type error here too, not a shape error
        with pytest.raises(TypeError, match="sample must be a torch.Tensor, got list"):
            feature_size(model, "block1", bad)
    labels = torch.zeros(len(bad), dtype=torch.int64)
    with pytest.raises(error, match=match):
        _as_images(bad, labels, None, "cpu")


def test_evaluation_order_mixes_a_class_sorted_set_and_keeps_any_other():
    from fsmooth.data import evaluation_order
    labels = torch.arange(10).repeat_interleave(7)             # an ImageFolder tree: 7 per class, class order
    images = torch.arange(70).view(70, 1, 1, 1).expand(70, 3, 2, 2)
    x, y, how = evaluation_order(images, labels)
    assert "fixed permutation" in how and len(set(y[:20].tolist())) >= 6  # the first 20 span the classes
    assert torch.equal(labels[x[:, 0, 0, 0]], y)                # images and labels move together
    x2, y2, _ = evaluation_order(images, labels)
    assert torch.equal(y2, y) and torch.equal(x2, x)            # one fixed order: a smaller n is a prefix
    mixed = labels[torch.randperm(70, generator=torch.Generator().manual_seed(5))]
    assert evaluation_order(images, mixed)[1] is mixed and evaluation_order(images, mixed)[2] == "the source's order"
    one_class = torch.zeros(70, dtype=torch.int64)
    assert evaluation_order(images, one_class)[2] == "the source's order"


def test_evaluate_warns_when_the_first_n_images_are_one_class():
    from fsmooth.evaluation.api import _as_images
    labels = torch.arange(3).repeat_interleave(4)
    images = torch.rand(12, 3, 4, 4)
    with pytest.warns(RuntimeWarning, match="first n=4 images are all of class 0"):
        _as_images(images, labels, 4, "cpu")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _as_images(images, labels, 5, "cpu")   # two classes: no warning
        _as_images(images, labels, None, "cpu")
