"""ResumableSquare, ResumableFAB, ResumableAPGD and ResumableAPGDT: pyautoattack's Square, FAB-T, APGD and
APGD-T draw for draw; a run stopped part-way goes on."""
import pytest
import torch
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
from pyautoattack.fab_pt import FABAttack_PT
from pyautoattack.square import SquareAttack

from evaluation_helpers import NoisyKillable, SimulatedKill, separable_data, trained_tiny_net
from fsmooth.evaluation.attacks import _FeatureLossOracle
from fsmooth.models.prefix import prefix as network_prefix
from fsmooth.evaluation.resumable_library import ResumableAPGD, ResumableAPGDT, ResumableFAB, ResumableSquare

EPS = 16 / 255  # some images fooled within the queries, some not


@pytest.fixture(scope="module")
def setup():
    x, y = separable_data(n=12, seed=3)
    return NoisyKillable(trained_tiny_net(), 0.05), x, y


def _library(model, n_restarts=1, n_queries=60, seed=2):
    # AutoAttack's own settings for its Square (pyautoattack.AutoAttack builds it so).
    return SquareAttack(model, p_init=.8, n_queries=n_queries, eps=EPS, norm="Linf", n_restarts=n_restarts,
                        seed=seed, verbose=False, device=torch.device("cpu"), resc_schedule=False)


@pytest.mark.parametrize("n_restarts", [1, 2])
def test_the_points_are_the_librarys(setup, n_restarts):
    model, x, y = setup
    lib = _library(model, n_restarts)
    torch.manual_seed(0)
    expected = lib.perturb(x, y)
    model.calls = 0
    torch.manual_seed(0)
    got = ResumableSquare.like(lib).perturb(x, y)
    assert torch.equal(got, expected)
    fooled = (model.net(expected).argmax(1) != y).sum().item()
    assert 0 < fooled < len(y) and model.calls > 20            # some fooled, some survived many queries
    assert (expected - x).abs().amax() <= EPS + 1e-6


def _recorder(also=None):
    """``(checkpoint, saved)``: a checkpoint that keeps every state it is given in ``saved``, as copies with the
    global random state (as the caller saves them), and calls ``also()`` after each."""
    saved = []

    def checkpoint(make_state):
        tensors, meta = make_state()
        saved.append(({k: v.clone() for k, v in tensors.items()}, dict(meta), torch.get_rng_state()))
        if also is not None:
            also()

    return checkpoint, saved


def _killed_then_resumed(attack, model, x, y, limit, checkpoint, saved, fresh=None):
    """Run killed at ``model``'s call ``limit``, then resumed from its last save with that save's random state
    (by ``fresh()``, a new attack as a new process would build it, when given): ``(points, saved meta)``, or
    ``None`` when it was killed before anything was saved."""
    saved.clear()
    model.limit, model.calls = limit, 0
    torch.manual_seed(0)
    with pytest.raises(SimulatedKill):
        attack.perturb(x, y, checkpoint=checkpoint)
    model.limit = None
    if not saved:
        return None
    tensors, meta, rng = saved[-1]
    torch.set_rng_state(rng)
    model.calls = 0
    return (fresh() if fresh else attack).perturb(x, y, resume=(tensors, meta)), meta


@pytest.mark.parametrize("n_restarts", [1, 2])
def test_a_run_killed_between_queries_goes_on_with_the_same_points(setup, n_restarts):
    model, x, y = setup
    attack = ResumableSquare.like(_library(model, n_restarts))
    checkpoint, saved = _recorder()

    model.calls = 0
    torch.manual_seed(0)
    straight = attack.perturb(x, y, checkpoint=checkpoint)
    total, states = model.calls, len(saved)
    assert states > 20 and {m["restart"] for _, m, _ in saved} == set(range(n_restarts))
    for limit in (2, total // 3, total - 3):
        got = _killed_then_resumed(attack, model, x, y, limit, checkpoint, saved)
        if got is None:  # killed before its first query: it starts over
            assert limit == 2
            continue
        assert torch.equal(got[0], straight), (limit, got[1])


def _never(make_state):
    raise AssertionError("a run that cannot resume saved nothing")


def test_what_cannot_resume_runs_whole_and_refuses_a_resume(setup):
    model, x, y = setup
    lib = _library(model)
    lib.targeted = True                                          # the library's targeted Square
    torch.manual_seed(0)
    expected = lib.perturb(x, (y + 1) % 10)
    torch.manual_seed(0)
    assert torch.equal(ResumableSquare.like(lib).perturb(x, (y + 1) % 10, checkpoint=_never), expected)
    with pytest.raises(ValueError, match="untargeted L-inf"):
        ResumableSquare.like(lib).perturb(x, y, resume=({}, {}))


def _agrees_with_library(lib, resumable, x, y):
    """``lib``'s points from seed 0, once ``resumable``'s copy of it has drawn the same ones from the same seed."""
    torch.manual_seed(0)
    expected = lib.perturb(x, y)
    torch.manual_seed(0)
    assert torch.equal(resumable.like(lib).perturb(x, y), expected)
    return expected


def _fab(model, n_target_classes=3, n_iter=6, seed=2):
    # AutoAttack's own FAB (pyautoattack.AutoAttack builds it so), made FAB-T as run_standard_evaluation does.
    fab = FABAttack_PT(model, n_restarts=5, n_iter=n_iter, eps=EPS, seed=seed, norm="Linf", verbose=False,
                       device=torch.device("cpu"))
    fab.targeted, fab.n_restarts, fab.n_target_classes = True, 1, n_target_classes
    return fab


def test_fab_t_points_are_the_librarys(setup):
    model, x, y = setup
    lib = _fab(model)
    expected = _agrees_with_library(lib, ResumableFAB, x, y)
    fooled = (model.net(expected).argmax(1) != y).sum().item()
    assert 0 < fooled < len(y)                                   # some fooled, some survived every target
    lib.targeted = False                                         # untargeted FAB: the library's own run
    torch.manual_seed(0)
    expected = lib.perturb(x, y)
    torch.manual_seed(0)
    assert torch.equal(ResumableFAB.like(lib).perturb(x, y), expected)
    with pytest.raises(ValueError, match="only the targeted FAB"):
        ResumableFAB.like(lib).perturb(x, y, resume=({}, {}))
    torch.manual_seed(0)                                         # a checkpoint is not called, the run is whole
    assert torch.equal(ResumableFAB.like(lib).perturb(x, y, checkpoint=_never), expected)


def test_fab_t_killed_inside_a_target_class_goes_on_from_its_start(setup):
    model, x, y = setup
    attack = ResumableFAB.like(_fab(model))
    checkpoint, saved = _recorder()

    model.calls = 0
    torch.manual_seed(0)
    straight = attack.perturb(x, y, checkpoint=checkpoint)
    total = model.calls
    assert [m["target_class"] for _, m, _ in saved] == [2, 3, 4]
    for limit in (total // 2, total - 2):                        # inside the second and the last target class
        resumed, meta = _killed_then_resumed(attack, model, x, y, limit, checkpoint, saved)
        assert meta["target_class"] > 2 and torch.equal(resumed, straight), (limit, meta)
        assert model.calls < total                               # the finished target classes did not rerun


def test_like_takes_only_the_library_attack_it_resumes(setup):
    model, _, _ = setup
    square = ResumableSquare.like(_library(model))
    assert square.n_queries == 60 and square.eps == EPS and square.seed == 2   # every setting carried over
    with pytest.raises(TypeError, match="ResumableFAB.like takes a FABAttack_PT, got ResumableSquare"):
        ResumableFAB.like(square)


def _apgd(model, loss="ce", n_restarts=1, eot_iter=1, n_iter=12, seed=2, eps=EPS):
    # AutoAttack's own APGD (pyautoattack.AutoAttack builds it so), with a small budget.
    attack = APGDAttack(model, n_restarts=n_restarts, n_iter=n_iter, verbose=False, eps=eps, norm="Linf",
                        eot_iter=eot_iter, rho=.75, seed=seed, device=torch.device("cpu"))
    attack.loss = loss
    return attack


def _apgd_t(model, n_target_classes=3, n_restarts=1, n_iter=12, seed=2, eps=EPS):
    return APGDAttack_targeted(model, n_restarts=n_restarts, n_iter=n_iter, verbose=False, eps=eps, norm="Linf",
                               eot_iter=1, rho=.75, seed=seed, device=torch.device("cpu"),
                               n_target_classes=n_target_classes)


def _apgd_oracle(model, n_restarts=1, n_iter=12, seed=2, eps=EPS):
    # The adaptive attack's APGD: CE + lam * max(L_F, delta) through the library's oracle (TF-model) interface.
    oracle = _FeatureLossOracle(model, network_prefix(model.net, None), lam=2.0, delta=0.0)
    return APGDAttack(oracle, n_restarts=n_restarts, n_iter=n_iter, verbose=False, eps=eps, norm="Linf",
                      eot_iter=1, rho=.75, seed=seed, loss="ce", device=torch.device("cpu"), is_tf_model=True)


APGD_CASES = [  # (make, resumable class, settings): CE and DLR, restarts, EOT draws, APGD-T's target classes
    (_apgd, ResumableAPGD, {"loss": "ce"}),
    (_apgd_oracle, ResumableAPGD, {"n_restarts": 2}),
    (_apgd, ResumableAPGD, {"loss": "dlr", "n_restarts": 2}),
    (_apgd, ResumableAPGD, {"loss": "ce", "n_restarts": 2, "eot_iter": 2}),
    (_apgd_t, ResumableAPGDT, {}),
    (_apgd_t, ResumableAPGDT, {"n_target_classes": 2, "n_restarts": 2}),
]


@pytest.mark.parametrize("make, resumable, settings", APGD_CASES)
def test_apgd_points_are_the_librarys(setup, make, resumable, settings):
    model, x, y = setup
    expected = _agrees_with_library(make(model, eps=4 / 255, **settings), resumable, x, y)
    fooled = (model.net(expected).argmax(1) != y).sum().item()
    assert 0 < fooled < len(y)                                   # some fooled, some survived
    assert (expected - x).abs().amax() <= 4 / 255 + 1e-6


@pytest.mark.parametrize("make, resumable, settings", APGD_CASES)
def test_apgd_killed_part_way_goes_on_with_the_same_points(setup, make, resumable, settings):
    model, x, y = setup

    def fresh():  # nothing carried over from the killed run's attack object (APGD-T's y_target, say)
        return resumable.like(make(model, eps=3 / 255, **settings))  # later restarts and targets have work

    attack = fresh()
    calls_at = []
    checkpoint, saved = _recorder(lambda: calls_at.append(model.calls))

    model.calls = 0
    torch.manual_seed(0)
    straight = attack.perturb(x, y, checkpoint=checkpoint)
    total = model.calls
    iters = [m["iter"] for _, m, _ in saved]
    assert None in iters and set(range(12)) <= set(iters)      # before each restart and each iteration
    places = {tuple(m.get(k) for k in ("target_class", "restart")) for _, m, _ in saved}
    assert len(places) == attack.n_restarts * getattr(attack, "n_target_classes", 1)
    last = next(t for t, m, _ in reversed(saved) if m["iter"] is None)
    assert 0 < last["acc"].sum() < len(y) or len(places) == 1  # the last restart (or target) attacks some
    for limit in (3, total // 3, total // 2, total - 4, total - 1):
        calls_at.clear()
        resumed, meta = _killed_then_resumed(attack, model, x, y, limit, checkpoint, saved, fresh)
        assert torch.equal(resumed, straight), (limit, meta)
        # The resumed run makes exactly the calls the straight run made after that save: nothing done twice,
        # nothing extra.
        assert model.calls == total - calls_at[len(saved) - 1], (limit, meta)


def test_apgd_what_cannot_resume_runs_whole_and_refuses_a_resume(setup):
    model, x, y = setup
    lib = _apgd(model, eps=4 / 255)
    torch.manual_seed(0)
    expected = lib.perturb(x, y, best_loss=True)                 # the library's best-loss run
    torch.manual_seed(0)
    assert torch.equal(ResumableAPGD.like(lib).perturb(x, y, best_loss=True, checkpoint=_never), expected)
    with pytest.raises(ValueError, match="only the L-inf APGD attack"):
        ResumableAPGD.like(lib).perturb(x, y, best_loss=True, resume=({}, {}))
    lib_t = _apgd_t(model, eps=4 / 255)
    lib_t.norm = "L2"                                            # another norm: the library's run
    torch.manual_seed(0)
    expected = lib_t.perturb(x, y)
    torch.manual_seed(0)
    assert torch.equal(ResumableAPGDT.like(lib_t).perturb(x, y, checkpoint=_never), expected)
    with pytest.raises(ValueError, match="only the L-inf APGD-T attack"):
        ResumableAPGDT.like(lib_t).perturb(x, y, resume=({}, {}))


def _max_loss_reference(lib, x, y):
    """The library's restart loop (``APGDAttack.perturb``) written out around its own ``attack_single_run``,
    keeping for every image it attacks the point of highest loss over its restarts: an image never fooled
    comes back as that point, the others as the library's."""
    lib.init_hyperparam(x)
    acc = (lib.model.predict(x) if lib.is_tf_model else lib.model(x)).argmax(1) == y
    adv, x_max = x.clone(), x.clone()
    loss_max = torch.full((x.shape[0],), -float("inf"))
    torch.random.manual_seed(lib.seed)
    for _ in range(lib.n_restarts):
        idx = acc.nonzero()[:, 0]
        if idx.numel() == 0:
            break
        best, acc_run, loss, adv_run = lib.attack_single_run(x[idx], y[idx])
        higher = loss > loss_max[idx]
        x_max[idx[higher]], loss_max[idx[higher]] = best[higher], loss[higher]
        fooled = ~acc_run.bool()
        adv[idx[fooled]], acc[idx[fooled]] = adv_run[fooled], False
    return torch.where((acc & torch.isfinite(loss_max))[:, None, None, None], x_max, adv)


# eps small enough that some images survive every noisy pass of the run, large enough that some do not
@pytest.mark.parametrize("make, settings, eps", [(_apgd, {"loss": "ce"}, 2 / 255),
                                                 (_apgd, {"loss": "dlr", "n_restarts": 2}, 2.5 / 255),
                                                 (_apgd_oracle, {"n_restarts": 2}, 2 / 255)])
def test_apgd_max_loss_returns_the_highest_loss_point_of_an_image_it_did_not_fool(setup, make, settings, eps):
    model, x, y = setup
    lib = make(model, eps=eps, **settings)
    torch.manual_seed(0)
    expected = _max_loss_reference(lib, x, y)
    torch.manual_seed(0)
    got = ResumableAPGD.like(lib).perturb(x, y, unfooled="max-loss")
    assert torch.equal(got, expected)
    torch.manual_seed(0)
    clean = ResumableAPGD.like(lib).perturb(x, y)                # the library's choice: such an image clean
    same = (got == clean).flatten(1).all(1)
    unmoved = (clean == x).flatten(1).all(1)
    assert same.any() and (~same).any()                         # some fooled (same point), some not
    assert torch.equal(~same, unmoved & ~(got == x).flatten(1).all(1))  # only points the library left clean move
    assert (got - x).abs().amax() <= eps + 1e-6 and got.min() >= 0 and got.max() <= 1


def test_apgd_max_loss_killed_part_way_goes_on_with_the_same_points(setup):
    model, x, y = setup

    class MaxLoss:  # the adaptive attack's call: unfooled images come back as their highest-loss points
        def __init__(self):
            self.attack = ResumableAPGD.like(_apgd_oracle(model, n_restarts=2, eps=2 / 255))  # some not fooled

        def perturb(self, x, y, **kwargs):
            return self.attack.perturb(x, y, unfooled="max-loss", **kwargs)

    checkpoint, saved = _recorder()

    model.calls = 0
    torch.manual_seed(0)
    straight = MaxLoss().perturb(x, y, checkpoint=checkpoint)
    total = model.calls
    assert {"x_max", "loss_max"} <= set(saved[-1][0])
    torch.manual_seed(0)
    assert not torch.equal(straight, MaxLoss().attack.perturb(x, y))  # some points are highest-loss ones
    for limit in (3, total // 2, total - 2):
        resumed, meta = _killed_then_resumed(MaxLoss(), model, x, y, limit, checkpoint, saved, MaxLoss)
        assert torch.equal(resumed, straight), (limit, meta)
    tensors, meta, _ = saved[-1]
    without = {k: v for k, v in tensors.items() if k not in ("x_max", "loss_max")}  # saved by the clean choice
    with pytest.raises(ValueError, match="lacks"):
        MaxLoss().perturb(x, y, resume=(without, meta))


def test_apgd_unfooled_is_checked(setup):
    model, x, y = setup
    attack = ResumableAPGD.like(_apgd(model, eps=4 / 255))
    with pytest.raises(ValueError, match="unfooled must be one of"):
        attack.perturb(x, y, unfooled="best")
    with pytest.raises(ValueError, match="highest-loss points"):
        attack.perturb(x, y, best_loss=True, unfooled="max-loss")
