"""Attacks and scoring: the attacks are real, the adaptive loss has its L_F term, the bookkeeping is right."""
import math

import pytest
import torch

from evaluation_helpers import TinyNet, separable_data, trained_tiny_net
from fsmooth.evaluation.attacks import (APGD, EOTPGD, AdaptiveAPGD, APGDTargeted, Square, TorchattacksEOTPGD,
                                        _FeatureLossOracle, dlr_loss_targeted)
from fsmooth.evaluation.scoring import (choose_candidates, eps_sweep_flag, gradient_masking_flag,
                                        perturbation_check, rescore_summary, wilson_interval, worst_case)
from fsmooth.functional import feature_loss
from fsmooth.models.prefix import prefix

EPS = 8 / 255


@pytest.fixture(scope="module")
def trained():
    model = trained_tiny_net()
    x, y = separable_data()
    return model, x[:20], y[:20]


def accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@pytest.mark.parametrize("make", [
    lambda m: EOTPGD(m, eps=EPS, steps=10, eot_iter=1, n_restarts=1),
    lambda m: EOTPGD(m, eps=EPS, steps=10, eot_iter=1, n_restarts=1, loss="dlr-targeted", n_target_classes=2),
    lambda m: APGD(m, eps=EPS, n_iter=10),
    lambda m: APGDTargeted(m, eps=EPS, n_iter=10, n_target_classes=2),
    lambda m: AdaptiveAPGD(m, m, eps=EPS, lam=-1.0, n_iter=10),
    lambda m: TorchattacksEOTPGD(m, eps=EPS, steps=10, eot_iter=1),
], ids=["pgd-ce", "pgd-dlr-t", "apgd-ce", "apgd-t", "adaptive", "torchattacks"])
def test_white_box_attacks_break_an_undefended_model(trained, make):
    model, x, y = trained
    assert accuracy(model, x, y) >= 0.9          # the model learned the task
    x_adv = make(model)(x, y)
    assert accuracy(model, x_adv, y) <= 0.1      # and the attack really breaks it
    check = perturbation_check(x, x_adv, EPS)
    assert check["ok"], check
    assert check["max_linf"] > EPS / 2           # it used the budget


def test_square_finds_adversarial_examples_without_gradients(trained):
    model, x, y = trained
    x_adv = Square(model, eps=16 / 255, n_queries=200, seed=1)(x, y)
    assert perturbation_check(x, x_adv, 16 / 255)["ok"]
    assert accuracy(model, x_adv, y) < accuracy(model, x, y) - 0.3


def test_apgd_best_loss_moves_every_image_where_the_default_leaves_the_misclassified_clean(trained):
    """The transfer attack's points: an image the model already gets wrong is attacked too."""
    model, x, y = trained
    y = y.clone()
    y[:3] = (y[:3] + 1) % int(model(x[:1]).shape[1])          # three images the model gets "wrong"
    default = APGD(model, eps=EPS, n_iter=10, seed=2)
    best = APGD(model, eps=EPS, n_iter=10, best_loss=True, seed=2)
    assert default.resumable and not best.resumable and best.settings()["best_loss"] is True
    x_default, x_best = default(x, y), best(x, y)
    moved = lambda a: (a - x).flatten(1).abs().amax(1) > 0  # noqa: E731
    assert not moved(x_default)[:3].any()                    # the library's default: wrong images stay clean
    assert moved(x_best).all() and perturbation_check(x, x_best, EPS)["ok"]
    with torch.no_grad():
        ce = lambda a: torch.nn.functional.cross_entropy(model(a), y, reduction="none")  # noqa: E731
        assert (ce(x_best) >= ce(x) - 1e-6).all() and (ce(x_best)[:3] > ce(x)[:3]).all()
    with pytest.raises(TypeError, match="best_loss"):
        APGD(model, best_loss=1)


def test_adaptive_apgd_with_lambda_zero_is_the_library_apgd(trained):
    model, x, y = trained
    ours = AdaptiveAPGD(model, model, eps=4 / 255, lam=0.0, n_iter=8, seed=3, unfooled="clean",
                        attack_all=False)(x, y)
    library = APGD(model, eps=4 / 255, n_iter=8, seed=3)(x, y)
    assert torch.equal(ours, library)
    moved = AdaptiveAPGD(model, model, eps=4 / 255, lam=50.0, delta=0.0, n_iter=8, seed=3, unfooled="clean",
                         attack_all=False)(x, y)
    assert not torch.equal(moved, library)       # the L_F term changes the trajectory
    # By default an image it does not fool comes back as its highest-loss point: APGD's unfooled="max-loss"
    # (this model gets all 20 images right, so attack_all, the default too, attacks the same ones).
    assert accuracy(model, x, y) == 1.0
    ours = AdaptiveAPGD(model, model, eps=4 / 255, lam=0.0, n_iter=8, seed=3)(x, y)
    assert torch.equal(ours, APGD(model, eps=4 / 255, n_iter=8, seed=3, unfooled="max-loss", attack_all=True)(x, y))
    assert torch.equal(ours, APGD(model, eps=4 / 255, n_iter=8, seed=3, unfooled="max-loss")(x, y))
    unfooled = (library == x).flatten(1).all(1)
    assert unfooled.any() and not unfooled.all()  # some images survive, and those are the ones that differ
    assert torch.equal((ours != library).flatten(1).any(1), unfooled)
    with torch.no_grad():
        ce = lambda a: torch.nn.functional.cross_entropy(model(a), y, reduction="none")  # noqa: E731
        assert (ce(ours)[unfooled] > ce(x)[unfooled]).all()


def test_unfooled_is_checked_and_recorded(trained):
    model = trained[0]
    assert AdaptiveAPGD(model, model).settings()["unfooled"] == "max-loss"
    assert APGD(model).settings()["unfooled"] == "clean"
    assert AdaptiveAPGD(model, model).settings()["attack_all"] is True and APGD(model).settings()["attack_all"] is False
    for make in (lambda: APGD(model, unfooled="best"), lambda: AdaptiveAPGD(model, model, unfooled=None),
                 lambda: APGD(model, best_loss=True, unfooled="max-loss"),
                 lambda: APGD(model, best_loss=True, attack_all=True)):
        with pytest.raises(ValueError, match="unfooled"):
            make()
    for make in (lambda: APGD(model, attack_all=1), lambda: AdaptiveAPGD(model, model, attack_all="yes")):
        with pytest.raises(TypeError, match="attack_all"):
            make()


class _FirstPassWrong(torch.nn.Module):
    """A stand-in for a randomized defense whose first draw happens to get every image wrong: the first forward
    pass returns the logits negated, every later one the model's own."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        logits = self.model(x)
        return -logits if self.calls == 1 else logits


@pytest.mark.parametrize("make", [
    lambda m: APGD(m, eps=EPS, n_iter=10, seed=5, unfooled="max-loss", attack_all=True),
    lambda m: AdaptiveAPGD(m, m.model, eps=EPS, lam=1.0, n_iter=10, seed=5),
], ids=["apgd", "adaptive"])
def test_attack_all_attacks_the_images_one_draw_got_wrong(trained, make):
    """The library attacks only the images its first pass gets right; through a randomized defense that pass is
    one draw, and an image it got wrong comes back clean, to be scored on a fresh draw: unattacked."""
    model, x, y = trained
    assert accuracy(model, x, y) == 1.0
    with torch.no_grad():
        assert (_FirstPassWrong(model)(x).argmax(1) != y).all()        # the first draw gets every image wrong
    skipped = APGD(_FirstPassWrong(model), eps=EPS, n_iter=10, seed=5, unfooled="max-loss")(x, y)
    assert torch.equal(skipped, x) and accuracy(model, skipped, y) == 1.0   # all left clean, all "robust"
    x_adv = make(_FirstPassWrong(model))(x, y)
    assert perturbation_check(x, x_adv, EPS)["ok"]
    assert accuracy(model, x_adv, y) <= 0.1                            # attacked, they fall


def test_same_settings_reads_a_record_saved_before_a_setting_existed(trained):
    """A chunk saved before ``unfooled`` existed was attacked with the clean choice: the adaptive attack's default
    since is another attack's result, APGD's default is the same one."""
    import json

    model = trained[0]
    for attack, before in ((APGD(model, seed=4), True), (AdaptiveAPGD(model, model, lam=1.0, seed=4), False),
                           (AdaptiveAPGD(model, model, lam=1.0, seed=4, unfooled="clean", attack_all=False), True)):
        saved = json.loads(json.dumps(attack.settings()))       # as a chunk's JSON reads back
        assert attack.same_settings(saved)
        older = {k: v for k, v in saved.items() if k not in ("unfooled", "attack_all")}
        assert attack.same_settings(older) is before
        assert not attack.same_settings({**saved, "seed": 5}) and not attack.same_settings(None)
    eot = EOTPGD(model, steps=7)
    assert eot.same_settings(json.loads(json.dumps(eot.settings())))
    assert not eot.same_settings({**json.loads(json.dumps(eot.settings())), "steps": 8})


def test_adaptive_loss_gradient_includes_the_feature_term():
    torch.manual_seed(0)
    model = TinyNet().double().eval()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64) * 0.8 + 0.1
    y = torch.tensor([1, 4, 7])
    features = prefix(model)
    lf = feature_loss(features(x)).detach()
    delta = float(lf.min()) * 0.5                 # below every L_F: the max() passes the feature gradient
    lam = 3.0
    oracle = _FeatureLossOracle(model, features, lam, delta)
    _, loss, grad = oracle.get_logits_loss_grad_xent(x, y)
    _, loss0, grad0 = _FeatureLossOracle(model, features, 0.0, delta).get_logits_loss_grad_xent(x, y)
    assert torch.allclose(loss - loss0, lam * lf)
    # Finite differences of the full per-sample loss along random directions (piecewise-linear net: tiny h).
    for seed in range(3):
        d = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        h = 1e-6
        _, plus = oracle.loss(x + h * d, y)
        _, minus = oracle.loss(x - h * d, y)
        numeric = (plus - minus) / (2 * h)
        analytic = (grad * d).flatten(1).sum(1)
        assert torch.allclose(numeric, analytic, rtol=1e-5, atol=1e-8)
    # The L_F part of the gradient is non-zero and equals lam * dL_F/dx.
    xf = x.clone().requires_grad_(True)
    lf_grad, = torch.autograd.grad(feature_loss(features(xf)).sum(), xf)
    assert lf_grad.abs().sum() > 0
    assert torch.allclose(grad - grad0, lam * lf_grad, atol=1e-10)
    # Above delta the max() is flat: no feature gradient.
    _, _, flat = _FeatureLossOracle(model, features, lam, float(lf.max()) * 2).get_logits_loss_grad_xent(x, y)
    assert torch.allclose(flat, grad0)


def test_attack_repr_shows_hyperparameters(trained):
    model = trained[0]
    text = repr(EOTPGD(model, eps=EPS, steps=100, eot_iter=20, n_restarts=2))
    for part in ("steps=100", "eot_iter=20", "n_restarts=2", "loss='ce'", f"eps={EPS!r}"):
        assert part in text
    assert AdaptiveAPGD(model, model, lam=-10.0).settings()["lam"] == -10.0
    with pytest.raises(ValueError, match="loss"):
        EOTPGD(model, loss="hinge")
    empty = torch.zeros(0, 3, 8, 8)
    assert EOTPGD(model)(empty, torch.zeros(0, dtype=torch.int64)).shape == empty.shape
    with pytest.raises(ValueError, match="eps"):
        APGD(model, eps=2.0)


class _NoisyCounter(torch.nn.Module):
    """``net`` plus fresh logit noise per row (like the defense's per-sample noise); records batch sizes."""

    def __init__(self, net, scale):
        super().__init__()
        self.net, self.scale, self.batches = net, scale, []

    def forward(self, x):
        self.batches.append(x.shape[0])
        logits = self.net(x)
        return logits + self.scale * torch.randn_like(logits)


class _NoisyInput(torch.nn.Module):
    """``net(x + noise)``, fresh uniform noise per row from the global RNG (like the defense's start)."""

    def __init__(self, net, scale):
        super().__init__()
        self.net, self.scale = net, scale

    def forward(self, x):
        return self.net(x + self.scale * (2 * torch.rand_like(x) - 1))


@pytest.mark.parametrize("loss", ["ce", "dlr-targeted"])
def test_eot_draws_batched_as_copies_give_the_sequential_estimate(trained, loss):
    """The EOT draws run as copies of each image in one pass. Copies draw their noise in the order sequential
    passes would (draw-major), so with the same seed the batched estimate is the sequential one: every
    draw's gradient and softmax counted once, whatever eot_batch (here 2 of 5 draws, a last group of 1)."""
    model, x, y = trained
    x, y = x[:7], y[:7]  # an odd batch
    noisy = _NoisyInput(model, scale=0.3)
    target = None if loss == "ce" else (y + 1) % 10
    estimates = []
    for eot_batch in (1, 2, None):
        torch.manual_seed(3)
        estimates.append(EOTPGD(noisy, eot_iter=5, eot_batch=eot_batch, loss=loss)._eot(x, y, target))
    # Batching changes float32 summation order: near-zero gradient entries are compared at the tensor's scale.
    scale = estimates[0][0].abs().max().item()
    for grad, probs in estimates[1:]:
        torch.testing.assert_close(grad, estimates[0][0], rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(probs, estimates[0][1], rtol=1e-5, atol=1e-7)
    torch.manual_seed(3)
    one = EOTPGD(noisy, eot_iter=1, loss=loss)._eot(x, y, target)
    assert not torch.allclose(one[0], estimates[0][0])  # the draws differ: five of them are not one
    kwargs = dict(eps=EPS, steps=4, eot_iter=3, n_restarts=1, loss=loss, n_target_classes=2)
    torch.manual_seed(4)
    sequential = EOTPGD(noisy, eot_batch=1, **kwargs)(x, y)
    torch.manual_seed(4)
    batched = EOTPGD(noisy, eot_batch=2, **kwargs)(x, y)
    torch.testing.assert_close(batched, sequential, rtol=0, atol=1e-6)
    counter = _NoisyCounter(model, scale=0.5)
    EOTPGD(counter, eps=EPS, steps=2, eot_iter=5, n_restarts=1, eot_batch=2)(x, y)
    assert counter.batches[-3:] == [14, 14, 7]  # 2 + 2 + 1 draws of the 7 images per step
    with pytest.raises(ValueError, match="eot_batch"):
        EOTPGD(model, eot_batch=0)
    assert "eot_batch=20" in repr(EOTPGD(model)) and EOTPGD(model, eot_batch=50).eot_batch == 20

@pytest.mark.filterwarnings("ignore:.*reached max_iters")  # 3 iterations: the tiny defense never converges
@pytest.mark.parametrize("outer_loops", [1, 2])
def test_copies_through_the_defended_classifier_are_independent_draws(trained, outer_loops):
    """What batched EOT relies on: identical copies of an image in one batch get their own defense noise (and
    with K outer loops, K runs each), so their outputs differ like sequential draws'."""
    from evaluation_helpers import TINY_DEFENSE, tiny_factory
    model, x, _ = trained
    clf = tiny_factory(model, TINY_DEFENSE.replace(sigma=0.2), outer_loops, None)
    with torch.no_grad():
        rows = clf(x[:3].repeat(4, 1, 1, 1)).view(4, 3, -1)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(rows[i], rows[j]), (i, j)


def test_targeted_dlr_prefers_the_target():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.5, 0.0]], requires_grad=True)
    loss = dlr_loss_targeted(logits, torch.tensor([0]), torch.tensor([2]))
    loss.backward()
    assert logits.grad[0, 0] < 0 < logits.grad[0, 2]


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0 and math.isclose(hi, 3.8414588 / 13.8414588, rel_tol=1e-6)
    lo, hi = wilson_interval(5, 10)
    assert math.isclose(lo + hi, 1.0) and math.isclose(lo, 0.2365931, rel_tol=1e-5)
    lo, hi = wilson_interval(620, 1000)
    assert lo < 0.62 < hi and hi - lo < 0.07
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_worst_case_candidates_and_rescoring():
    correct = {"clean": torch.tensor([1, 1, 1, 0, 1], dtype=torch.bool),
               "a": torch.tensor([1, 0, 1, 1, 1], dtype=torch.bool),
               "b": torch.tensor([1, 0, 0, 1, 1], dtype=torch.bool)}
    robust, fooled_by = worst_case(correct)
    assert robust.tolist() == [True, False, False, False, True]
    assert fooled_by == [None, "a", "b", "clean", None]
    x = torch.rand(5, 3, 2, 2)
    adv = {"a": x + 0.01, "b": x - 0.01}
    adv["a"][4] = x[4]                           # "a" failed to move image 4 (AutoAttack returns x there)
    cand, source = choose_candidates(x, adv, correct, fallback=["a", "b"])
    # Image 3, which only the clean pass got wrong, is re-scored on an attack's point, not on itself.
    assert source == ["a", "a", "b", "a", "b"]
    assert torch.equal(cand[1], adv["a"][1]) and torch.equal(cand[2], adv["b"][2]) and torch.equal(cand[3], adv["a"][3])
    assert torch.equal(cand[4], adv["b"][4])
    # An image whose fooling run returned it unmoved takes the next run that fooled it, then the fallback.
    adv["b"][2] = x[2]
    cand, source = choose_candidates(x, adv, correct, fallback=["a", "b"])
    assert source[2] == "a" and torch.equal(cand[2], adv["a"][2])
    adv["a"][2] = x[2]
    cand, source = choose_candidates(x, adv, correct, fallback=["a", "b"])
    assert source[2] is None and torch.equal(cand[2], x[2])
    runs = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 1], [1, 1, 0, 0]], dtype=torch.bool)
    s = rescore_summary(runs)
    assert s["per_run"] == [0.5, 0.5, 0.5] and s["std"] == 0.0
    assert s["correct_in_all_runs"]["correct"] == 1


def test_perturbation_check_catches_violations():
    x = torch.rand(4, 3, 5, 5) * 0.5 + 0.25
    ok = perturbation_check(x, x + EPS * torch.sign(torch.randn_like(x)), EPS)
    assert ok["ok"] and math.isclose(ok["max_linf"], EPS, rel_tol=1e-5)
    assert not perturbation_check(x, x + 2 * EPS, EPS)["within_eps"]
    bad = x.clone()
    bad[0, 0, 0, 0] = 1.2
    assert not perturbation_check(x, bad, 1.0)["in_range"]


def test_masking_and_sweep_flags():
    assert gradient_masking_flag({"square": 0.30}, {"apgd-ce": 0.40, "aa-standard": 0.35})["attack"] == "square"
    assert gradient_masking_flag({"square": 0.36}, {"apgd-ce": 0.40, "aa-standard": 0.35}) is None
    assert eps_sweep_flag({2 / 255: 0.6, 8 / 255: 0.3, 32 / 255: 0.01}) is None
    assert "rises" in eps_sweep_flag({2 / 255: 0.3, 8 / 255: 0.6, 32 / 255: 0.0})["message"]
    assert "32/255" in eps_sweep_flag({2 / 255: 0.6, 32 / 255: 0.5})["message"]
