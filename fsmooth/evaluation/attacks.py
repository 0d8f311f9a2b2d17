"""Attacks, one class per attack (torchattacks-style): ``attack(x, y) -> x_adv`` in [0, 1], L-inf ball ``eps``.

Every attack takes a classifier mapping [0, 1] images to logits. For Active
Defense that is :class:`fsmooth.defense.DefendedClassifier`, whose backward
pass is the straight-through (BPDA identity) gradient, so every white-box
attack here attacks the defense through it. Defaults are the published ones
(AutoAttack for APGD/Square, Athalye et al. 2018 for EOT); ``repr`` shows all
hyperparameters and :meth:`Attack.settings` returns them for reports.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from pyautoattack.autopgd_base import APGDAttack
from pyautoattack.square import SquareAttack

from .._validation import check_bool, check_positive_int
from ..functional import feature_loss
from ..models.prefix import prefix as network_prefix
from .resumable_library import ResumableAPGD, ResumableAPGDT, ResumableSquare, check_unfooled
from .store import json_value

__all__ = ["Attack", "APGD", "APGDTargeted", "AdaptiveAPGD", "EOTPGD", "Square", "TorchattacksEOTPGD",
           "dlr_loss", "dlr_loss_targeted", "AA_LOGGER"]

# pyautoattack reports its checks (zero gradients, randomness, ...) on this logger.
AA_LOGGER = "auto-attack"


class Attack:
    """Base class: stores the hyperparameters named in ``_params`` and prints them.

    ``_since``: the hyperparameters added after results were saved with this attack, each with the value the
    attack had before it existed; :meth:`same_settings` reads a saved record without them that way.
    """

    _params: tuple[str, ...] = ()
    _since: dict = {}

    def __init__(self, model, eps: float = 8 / 255, seed: int = 0):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps <= 1:
            raise ValueError(f"eps must be a number in [0, 1], got {eps!r}")
        self.model = model
        self.eps = float(eps)
        self.seed = int(seed)

    def settings(self) -> dict:
        """The hyperparameters, for reports."""
        return {"attack": type(self).__name__, "eps": self.eps, "seed": self.seed,
                **{name: getattr(self, name) for name in self._params}}

    def same_settings(self, saved) -> bool:
        """Whether ``saved`` (:meth:`settings` as a finished chunk recorded them, read back from JSON) are this
        attack's: a chunk attacked with other settings is not this attack's result."""
        if not isinstance(saved, dict):
            return False
        return json_value({**self._since, **saved}) == json_value(self.settings())

    def __repr__(self) -> str:
        s = self.settings()
        s.pop("attack")
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in s.items())})"

    resumable = False  # True: perturb also takes resume= and checkpoint= (fsmooth.evaluation.resumable)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, resume=None, checkpoint=None) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.clone()
        kwargs = {}
        if resume is not None or checkpoint is not None:
            if not self.resumable:
                raise TypeError(f"{type(self).__name__} cannot save or resume its work part-way "
                                "(resume and checkpoint must be None)")
            kwargs = {"resume": resume, "checkpoint": checkpoint}
        x_adv = self.perturb(x.detach(), y.detach(), **kwargs)
        # Guard against any attack stepping outside the threat model.
        return torch.min(torch.max(x_adv, x - self.eps), x + self.eps).clamp(0.0, 1.0).detach()

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _logger() -> logging.Logger:
    return logging.getLogger(AA_LOGGER)


def set_apgd_iterations(attack: APGDAttack, n_iter: int) -> None:
    """Change an APGD's iteration budget, including the checkpoint schedule its ``__init__`` derives from it."""
    attack.n_iter = attack.n_iter_orig = int(n_iter)
    attack.n_iter_2 = max(int(0.22 * n_iter), 1)
    attack.n_iter_min = max(int(0.06 * n_iter), 1)
    attack.size_decr = max(int(0.03 * n_iter), 1)


class APGD(Attack):
    """pyautoattack's APGD (Croce & Hein 2020) on the CE or DLR loss; ``eot_iter`` > 1 averages gradients (EOT).

    ``best_loss``: return for every image the point of highest loss the run reached (the library's
    ``perturb(best_loss=True)``), where by default an image the run does not fool comes back clean. A transfer
    attack carries these points to another model: each one moved, whether or not it fooled the model it was
    found on. That run is the library's whole run, which cannot save or resume part-way.
    ``unfooled="max-loss"``: the library's run, resumable, but an image it attacked and did not fool comes back
    as the point where its own loss (one draw of a randomized defense) was highest instead of clean
    (:class:`ResumableAPGD`). ``attack_all``: attack also the images the library would skip because its first
    pass got them wrong, which through a randomized defense is one draw (:class:`ResumableAPGD`).
    """

    _params = ("n_iter", "n_restarts", "eot_iter", "loss", "rho", "best_loss", "unfooled", "attack_all")
    _since = {"unfooled": "clean", "attack_all": False}  # 2026-11-28, 2026-11-29

    def __init__(self, model, eps: float = 8 / 255, n_iter: int = 100, n_restarts: int = 1, eot_iter: int = 1,
                 loss: str = "ce", rho: float = 0.75, best_loss: bool = False, unfooled: str = "clean",
                 attack_all: bool = False, seed: int = 0):
        super().__init__(model, eps, seed)
        if loss not in ("ce", "dlr"):
            raise ValueError(f"loss must be 'ce' or 'dlr', got {loss!r}")
        check_bool(best_loss, "best_loss")
        check_bool(attack_all, "attack_all")
        if best_loss and (check_unfooled(unfooled) != "clean" or attack_all):
            raise ValueError("best_loss already attacks every image and returns its highest-loss point: leave "
                             "unfooled 'clean' and attack_all False")
        self.n_iter, self.n_restarts, self.eot_iter, self.loss, self.rho = n_iter, n_restarts, eot_iter, loss, rho
        self.best_loss, self.unfooled, self.attack_all = best_loss, check_unfooled(unfooled), attack_all
        self.resumable = not best_loss  # best_loss is the library's whole run

    resumable = True  # the library's run, saved and resumed between iterations (ResumableAPGD)

    def perturb(self, x, y, *, resume=None, checkpoint=None):
        attack = ResumableAPGD(self.model, n_iter=self.n_iter, norm="Linf", n_restarts=self.n_restarts,
                               eps=self.eps, seed=self.seed, loss=self.loss, eot_iter=self.eot_iter, rho=self.rho,
                               device=x.device, logger=_logger())
        if self.best_loss:
            return attack.perturb(x, y, best_loss=True)
        return attack.perturb(x, y, unfooled=self.unfooled, attack_all=self.attack_all, resume=resume,
                              checkpoint=checkpoint)


class APGDTargeted(Attack):
    """pyautoattack's APGD-T: targeted DLR loss against each of the ``n_target_classes`` most likely wrong classes."""

    _params = ("n_iter", "n_restarts", "n_target_classes", "eot_iter", "rho")

    def __init__(self, model, eps: float = 8 / 255, n_iter: int = 100, n_restarts: int = 1,
                 n_target_classes: int = 9, eot_iter: int = 1, rho: float = 0.75, seed: int = 0):
        super().__init__(model, eps, seed)
        self.n_iter, self.n_restarts, self.n_target_classes = n_iter, n_restarts, n_target_classes
        self.eot_iter, self.rho = eot_iter, rho

    resumable = True  # the library's run, saved and resumed between iterations (ResumableAPGDT)

    def perturb(self, x, y, *, resume=None, checkpoint=None):
        attack = ResumableAPGDT(self.model, n_iter=self.n_iter, norm="Linf", n_restarts=self.n_restarts,
                                eps=self.eps, seed=self.seed, eot_iter=self.eot_iter, rho=self.rho,
                                n_target_classes=self.n_target_classes, device=x.device, logger=_logger())
        return attack.perturb(x, y, resume=resume, checkpoint=checkpoint)


class _FeatureLossOracle:
    """Supplies APGD with ``CE(model(x), y) + lam * max(L_F(x), delta)`` and its input gradient.

    pyautoattack's ``APGDAttack`` chooses its loss from a fixed table of names
    inside ``attack_single_run`` (the CE criterion is built inline), so it
    cannot take a loss callable. Its only entry point for an external loss is
    the framework-neutral oracle interface it uses for TensorFlow models
    (``is_tf_model=True``): ``predict(x) -> logits`` and
    ``get_logits_loss_grad_xent(x, y) -> (logits, per-sample loss, dloss/dx)``.
    This class implements that interface, so the step-size schedule, momentum,
    restarts and EOT loop are the library's, unchanged; with ``lam == 0`` the
    attack is exactly the library's APGD-CE (tested).

    ``L_F`` is taken on the *attacked input* ``x`` at ``layer`` of the
    undefended ``base_model`` (the quantity Active Defense thresholds);
    ``model`` is the defended classifier with its straight-through gradient.
    """

    def __init__(self, model, feature_net, lam: float, delta: float):
        self.model, self.feature_net, self.lam, self.delta = model, feature_net, float(lam), float(delta)

    def predict(self, x):
        with torch.no_grad():
            return self.model(x)

    def loss(self, x, y):
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, reduction="none")
        if self.lam != 0.0:
            lf = feature_loss(self.feature_net(x))
            loss = loss + self.lam * lf.clamp_min(self.delta).to(loss.dtype)
        return logits, loss

    def get_logits_loss_grad_xent(self, x, y):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits, loss = self.loss(x, y)
            grad, = torch.autograd.grad(loss.sum(), x)
        return logits.detach(), loss.detach(), grad.detach()


class AdaptiveAPGD(Attack):
    """The paper's adaptive attack (Table 3): APGD on ``CE + lam * max(L_F(x_adv), delta)``.

    ``lam > 0`` pushes ``L_F`` up, ``lam < 0`` pulls it below ``delta`` so the
    defense has little to undo. ``delta`` defaults to the defense's exit
    threshold (below it the defense does not move the input at all).
    ``unfooled`` and ``attack_all`` as in :class:`APGD`; here ``"max-loss"`` (the point of highest
    ``CE + lam * max(L_F, delta)``, the attacker's best) and ``True`` (every image attacked, also one the first
    defended pass happened to get wrong) by default: before 2026-11-28 an image it did not fool came back
    clean, and before 2026-11-29 an image that first pass got wrong was not attacked.
    """

    _params = ("lam", "delta", "layer", "n_iter", "n_restarts", "eot_iter", "rho", "unfooled", "attack_all")
    _since = {"unfooled": "clean", "attack_all": False}  # 2026-11-28, 2026-11-29

    def __init__(self, model, base_model, eps: float = 8 / 255, lam: float = 1.0, delta: float = 0.0124,
                 layer: str | None = None, n_iter: int = 100, n_restarts: int = 1, eot_iter: int = 1,
                 rho: float = 0.75, unfooled: str = "max-loss", attack_all: bool = True, seed: int = 0):
        super().__init__(model, eps, seed)
        self.base_model, self.lam, self.delta, self.layer = base_model, float(lam), float(delta), layer
        self.n_iter, self.n_restarts, self.eot_iter, self.rho = n_iter, n_restarts, eot_iter, rho
        self.unfooled, self.attack_all = check_unfooled(unfooled), check_bool(attack_all, "attack_all")
        self._feature_net = network_prefix(base_model, layer)

    resumable = True  # the library's run, saved and resumed between iterations (ResumableAPGD)

    def perturb(self, x, y, *, resume=None, checkpoint=None):
        oracle = _FeatureLossOracle(self.model, self._feature_net, self.lam, self.delta)
        attack = ResumableAPGD(oracle, n_iter=self.n_iter, norm="Linf", n_restarts=self.n_restarts, eps=self.eps,
                               seed=self.seed, loss="ce", eot_iter=self.eot_iter, rho=self.rho, device=x.device,
                               is_tf_model=True, logger=_logger())
        return attack.perturb(x, y, unfooled=self.unfooled, attack_all=self.attack_all, resume=resume,
                              checkpoint=checkpoint)


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Untargeted DLR loss (Croce & Hein 2020), per sample."""
    z, _ = logits.sort(dim=1)
    zy = logits.gather(1, y[:, None])[:, 0]
    top_other = torch.where(logits.argmax(1) == y, z[:, -2], z[:, -1])
    return -(zy - top_other) / (z[:, -1] - z[:, -3] + 1e-12)


def dlr_loss_targeted(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR loss (Croce & Hein 2020), per sample; needs at least 4 classes."""
    z, _ = logits.sort(dim=1)
    zy = logits.gather(1, y[:, None])[:, 0]
    zt = logits.gather(1, target[:, None])[:, 0]
    return -(zy - zt) / (z[:, -1] - 0.5 * (z[:, -3] + z[:, -4]) + 1e-12)


class EOTPGD(Attack):
    """L-inf PGD with Expectation over Transformation (Athalye et al. 2018) through the straight-through gradient.

    Each step averages the gradient over ``eot_iter`` independent draws of the defense noise. The draws run
    ``eot_batch`` at a time as copies of each image in one batch (the defense draws each row's noise on its
    own, so the copies are independent draws and the estimate is the sequential one's); ``None`` (default)
    runs all of them in one pass. On a GPU a pass's time is set mostly by its slowest image and the engine's
    slots (``max_batch``), so one pass of many copies costs far less than as many passes in turn (not yet
    measured there). A pass holds ``eot_batch`` times the attack's batch: lower it for a large network.
    ``loss``: ``"ce"``, ``"dlr"`` or ``"dlr-targeted"`` (each of the ``n_target_classes`` most likely wrong
    classes in turn, each with ``n_restarts`` random starts; after the first run only points whose
    EOT-averaged prediction is still correct are attacked again, as AutoAttack does). Step size ``alpha``
    defaults to ``2.5 * eps / steps`` (Madry et al. 2018). The returned point per sample is the iterate with
    the lowest EOT-averaged margin ``p_y - max_{j != y} p_j`` of the mean softmax over all steps, restarts and
    targets. The attack is resumable: ``fsmooth eval`` saves its state between steps
    (:mod:`fsmooth.evaluation.resumable`).
    """

    _params = ("steps", "alpha", "eot_iter", "eot_batch", "n_restarts", "loss", "n_target_classes")

    def __init__(self, model, eps: float = 8 / 255, steps: int = 100, eot_iter: int = 20, n_restarts: int = 2,
                 alpha: float | None = None, loss: str = "ce", n_target_classes: int = 3, seed: int = 0,
                 eot_batch: int | None = None):
        super().__init__(model, eps, seed)
        if loss not in ("ce", "dlr", "dlr-targeted"):
            raise ValueError(f"loss must be 'ce', 'dlr' or 'dlr-targeted', got {loss!r}")
        for name, value in (("steps", steps), ("eot_iter", eot_iter), ("n_restarts", n_restarts),
                            ("n_target_classes", n_target_classes)):
            check_positive_int(value, name)
        check_positive_int(eot_batch, "eot_batch", allow_none=True)
        self.steps, self.eot_iter, self.n_restarts, self.loss = steps, eot_iter, n_restarts, loss
        self.eot_batch = eot_iter if eot_batch is None else min(eot_batch, eot_iter)
        self.n_target_classes = n_target_classes
        self.alpha = float(alpha) if alpha is not None else 2.5 * self.eps / steps

    def _loss(self, logits, y, target):
        if self.loss == "ce":
            return F.cross_entropy(logits, y, reduction="none")
        if self.loss == "dlr":
            return dlr_loss(logits, y)
        return dlr_loss_targeted(logits, y, target)

    def _eot(self, x_adv, y, target):
        """Mean gradient and mean softmax over ``eot_iter`` draws, ``eot_batch`` copies per forward pass."""
        n = x_adv.shape[0]
        grad = torch.zeros_like(x_adv)
        probs = 0.0
        for start in range(0, self.eot_iter, self.eot_batch):
            k = min(self.eot_batch, self.eot_iter - start)
            xa = x_adv.detach().repeat(k, *([1] * (x_adv.dim() - 1))).requires_grad_(True)  # draw-major copies
            ys = y.repeat(k)
            ts = None if target is None else target.repeat(k)
            with torch.enable_grad():
                logits = self.model(xa)
                g, = torch.autograd.grad(self._loss(logits, ys, ts).sum(), xa)
            grad += g.view(k, *x_adv.shape).sum(0)
            probs = probs + logits.detach().float().softmax(1).view(k, n, -1).sum(0)
        return grad / self.eot_iter, probs / self.eot_iter

    @staticmethod
    def _margin(probs, y):
        py = probs.gather(1, y[:, None])[:, 0]
        other = probs.scatter(1, y[:, None], -1.0).max(1).values
        return py - other

    resumable = True  # perturb takes resume= and checkpoint= (see fsmooth.evaluation.resumable)

    def _targets(self, x, y):
        if self.loss != "dlr-targeted":
            return [None]
        with torch.no_grad():
            order = self.model(x).argsort(dim=1, descending=True)
        order = order[order != y[:, None]].view(x.shape[0], -1)  # wrong classes, most likely first
        return [order[:, k] for k in range(min(self.n_target_classes, order.shape[1]))]

    def perturb(self, x, y, *, resume=None, checkpoint=None):
        """``resume``: ``(tensors, meta)`` that ``checkpoint`` was given (the attack goes on from that step,
        with the same result as a run never stopped, provided the caller restored the global random state
        saved beside it); ``checkpoint(make_state)``: called before every step, may save ``make_state()``."""
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        best = x.clone()
        best_margin = torch.full((x.shape[0],), math.inf, device=x.device)
        at = None  # (target, restart, step) to resume at
        if resume is None:
            targets = self._targets(x, y)
        else:
            tensors, meta = resume
            best, best_margin = tensors["best"].to(x.device, x.dtype), tensors["best_margin"].to(x.device)
            targets = list(tensors["targets"].to(x.device)) if "targets" in tensors else [None]
            gen.set_state(tensors["gen"])
            at = (meta["target"], meta["restart"], meta["step"])
        for ti, target in enumerate(targets):
            for ri in range(self.n_restarts):
                if at is not None and (ti, ri) < at[:2]:
                    continue
                if at is not None:
                    idx, x_adv, first_step = tensors["idx"].to(x.device), tensors["x_adv"].to(x.device, x.dtype), at[2]
                    at = None
                else:
                    # Like AutoAttack's restarts: later runs attack only the points not yet fooled (EOT-mean margin).
                    idx = (torch.arange(x.shape[0], device=x.device) if ti == ri == 0
                           else (best_margin >= 0).nonzero()[:, 0])
                    if idx.numel() == 0:
                        return best
                    start = (torch.rand(x[idx].shape, generator=gen) * 2 - 1).to(x.device, x.dtype) * self.eps
                    x_adv, first_step = (x[idx] + start).clamp(0.0, 1.0), 0
                xs, ys = x[idx], y[idx]
                ts = None if target is None else target[idx]
                for step in range(first_step, self.steps + 1):
                    if checkpoint is not None:
                        checkpoint(lambda: self._state(best, best_margin, targets, gen, idx, x_adv, ti, ri, step))
                    grad, probs = self._eot(x_adv, ys, ts)
                    margin = self._margin(probs, ys)
                    better = margin < best_margin[idx]
                    best[idx[better]], best_margin[idx[better]] = x_adv[better], margin[better]
                    if step == self.steps:
                        break
                    x_adv = x_adv + self.alpha * grad.sign()
                    x_adv = torch.min(torch.max(x_adv, xs - self.eps), xs + self.eps).clamp(0.0, 1.0).detach()
        return best

    @staticmethod
    def _state(best, best_margin, targets, gen, idx, x_adv, target, restart, step):
        tensors = {"best": best, "best_margin": best_margin, "gen": gen.get_state(), "idx": idx, "x_adv": x_adv}
        if targets[0] is not None:
            tensors["targets"] = torch.stack(targets)
        return tensors, {"target": target, "restart": restart, "step": step}


class Square(Attack):
    """pyautoattack's Square attack (black-box, score-based; Andriushchenko et al. 2020), AutoAttack's settings.

    Resumable between queries (:class:`~fsmooth.evaluation.resumable_library.ResumableSquare`, the library's points)."""

    _params = ("n_queries", "p_init", "n_restarts")
    resumable = True

    def __init__(self, model, eps: float = 8 / 255, n_queries: int = 5000, p_init: float = 0.8,
                 n_restarts: int = 1, seed: int = 0):
        super().__init__(model, eps, seed)
        self.n_queries, self.p_init, self.n_restarts = n_queries, p_init, n_restarts

    def perturb(self, x, y, *, resume=None, checkpoint=None):
        attack = SquareAttack(self.model, p_init=self.p_init, n_queries=self.n_queries, eps=self.eps, norm="Linf",
                              n_restarts=self.n_restarts, seed=self.seed, verbose=False, device=x.device,
                              resc_schedule=False)
        return ResumableSquare.like(attack).perturb(x, y, resume=resume, checkpoint=checkpoint)


class TorchattacksEOTPGD(Attack):
    """Cross-check with an independent implementation: ``torchattacks.EOTPGD``."""

    _params = ("steps", "alpha", "eot_iter", "random_start")

    def __init__(self, model, eps: float = 8 / 255, steps: int = 100, eot_iter: int = 20,
                 alpha: float | None = None, random_start: bool = True, seed: int = 0):
        super().__init__(model, eps, seed)
        self.steps, self.eot_iter, self.random_start = steps, eot_iter, random_start
        self.alpha = float(alpha) if alpha is not None else 2.5 * self.eps / steps

    def perturb(self, x, y):
        import torchattacks  # optional cross-check library: only this attack needs it

        attack = torchattacks.EOTPGD(self.model, eps=self.eps, alpha=self.alpha, steps=self.steps,
                                     eot_iter=self.eot_iter, random_start=self.random_start)
        torch.manual_seed(self.seed)
        return attack(x, y)
