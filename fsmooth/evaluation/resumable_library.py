"""pyautoattack's APGD, APGD-T, Square and FAB-T attacks, able to stop part-way and go on with the same points.

Square's 5,000 queries are each a forward through the defense for every image not yet fooled, FAB-T runs
100 iterations for each of 9 target classes, and APGD with 20 EOT draws (AutoAttack rand) makes 2,000 defended
passes per restart: on one CPU core a chunk takes hours, on a GPU more than a device call.
:class:`ResumableSquare` runs the library's L-inf loop (pyautoattack 0.2.0's ``SquareAttack.perturb`` and
``attack_single_run``) draw for draw and hands its state to a ``checkpoint`` before each query;
:class:`ResumableFAB` runs ``FABAttack.perturb``'s targeted loop and does so before each target class;
:class:`ResumableAPGD` and :class:`ResumableAPGDT` run ``APGDAttack.perturb``'s restarts (``APGDAttack_targeted``'s
target classes and restarts) and ``attack_single_run``'s L-inf loop, and do so before each restart and each
iteration. ``resume`` goes on from such a state (the caller restores the global random state saved with it:
the attacks and the defense's noise draw from it). The points equal the library's
(``tests/test_evaluation_resumable_library.py``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
from pyautoattack.checks import check_zero_gradients
from pyautoattack.fab_pt import FABAttack_PT
from pyautoattack.square import SquareAttack

from .._validation import check_bool

__all__ = ["ResumableAPGD", "ResumableAPGDT", "ResumableFAB", "ResumableSquare", "UNFOOLED", "check_unfooled"]

UNFOOLED = ("clean", "max-loss")  # ResumableAPGD's choices for an image its runs did not fool


def check_unfooled(unfooled) -> str:
    """``unfooled`` when it is one of :data:`UNFOOLED`; a ``ValueError`` naming it otherwise."""
    if unfooled not in UNFOOLED:
        raise ValueError(f"unfooled must be one of {UNFOOLED}, got {unfooled!r}")
    return unfooled


class _Like:
    _library: type  # the pyautoattack class this one makes resumable

    @classmethod
    def like(cls, attack):
        """A resumable copy of ``attack`` (AutoAttack's own ``aa.square`` or ``aa.fab``) with all its settings."""
        if not isinstance(attack, cls._library):
            raise TypeError(f"{cls.__name__}.like takes a {cls._library.__name__}, got {type(attack).__name__}")
        new = cls.__new__(cls)
        new.__dict__.update(vars(attack))
        return new


class ResumableSquare(_Like, SquareAttack):
    """:class:`pyautoattack.square.SquareAttack` whose untargeted L-inf ``perturb`` can save and resume.

    ``perturb(x, y, resume=None, checkpoint=None)``: ``checkpoint(make_state)`` is called before each query
    (``make_state()`` gives ``(tensors, meta)``); ``resume`` is such a state, from which the run goes on (the
    caller restores the global random state saved with it: the squares and the defense's noise draw from it).
    Other norms, targeted runs and ``y=None`` are the library's whole run: ``checkpoint`` is not called, and
    ``resume`` is refused.
    """

    _library = SquareAttack

    def perturb(self, x, y=None, *, resume=None, checkpoint=None):
        if self.norm != "Linf" or self.targeted or y is None:  # the library's run, whole (checkpoint unused)
            if resume is not None:
                raise ValueError("only the untargeted L-inf Square attack with labels y can resume")
            return super().perturb(x, y)
        self.init_hyperparam(x)
        y = y.detach().clone().long().to(self.device)
        if resume is None:
            adv = x.clone()
            acc = self.predict(x).max(1)[1] == y
            torch.random.manual_seed(self.seed)
            torch.cuda.random.manual_seed(self.seed)
            first = 0
        else:
            tensors, meta = resume
            adv, acc = tensors["adv"].to(x.device, x.dtype), tensors["acc"].to(self.device)
            first = meta["restart"]
        for counter in range(first, self.n_restarts):
            ind_to_fool = _to_fool(acc)
            if ind_to_fool is None:
                continue
            x_to_fool, y_to_fool = x[ind_to_fool].clone(), y[ind_to_fool].clone()

            def with_restart(make, counter=counter):  # the state of this restart: adv and acc as it began
                tensors, meta = make()
                return {**tensors, "adv": adv, "acc": acc}, {**meta, "restart": counter}

            inner = None if checkpoint is None else (lambda make: checkpoint(lambda: with_restart(make)))
            adv_curr = self._linf_run(x_to_fool, y_to_fool, resume, inner)
            resume = None
            acc_curr = self.predict(adv_curr).max(1)[1] == y_to_fool
            ind_curr = (acc_curr == 0).nonzero().squeeze()
            acc[ind_to_fool[ind_curr]] = 0
            adv[ind_to_fool[ind_curr]] = adv_curr[ind_curr].clone()
        return adv

    def _linf_run(self, x, y, resume, checkpoint):
        """``attack_single_run``'s L-inf branch (its printing left out), resumable before each query."""
        with torch.no_grad():
            c, h, w = x.shape[1:]
            n_features = c * h * w
            n_ex_total = x.shape[0]
            if resume is None:
                x_best = torch.clamp(x + self.eps * self.random_choice([x.shape[0], c, 1, w]), 0., 1.)
                margin_min, loss_min = self.margin_and_loss(x_best, y)
                n_queries = torch.ones(x.shape[0]).to(self.device)
                if (margin_min < 0.0).all():
                    return x_best
                start = 0
            else:
                tensors, meta = resume
                x_best = tensors["x_best"].to(self.device, x.dtype)
                margin_min, loss_min, n_queries = (tensors[k].to(self.device)
                                                   for k in ("margin_min", "loss_min", "n_queries"))
                start = meta["query"]
            for i_iter in range(start, self.n_queries):
                if checkpoint is not None:
                    checkpoint(lambda: ({"x_best": x_best, "margin_min": margin_min, "loss_min": loss_min,
                                         "n_queries": n_queries}, {"query": i_iter}))
                idx_to_fool = (margin_min > 0.0).nonzero().squeeze()
                x_curr = self.check_shape(x[idx_to_fool])
                x_best_curr = self.check_shape(x_best[idx_to_fool])
                y_curr = y[idx_to_fool]
                if len(y_curr.shape) == 0:
                    y_curr = y_curr.unsqueeze(0)
                margin_min_curr = margin_min[idx_to_fool]
                loss_min_curr = loss_min[idx_to_fool]

                p = self.p_selection(i_iter)
                s = max(int(round(math.sqrt(p * n_features / c))), 1)
                s = min(s, min(h, w))
                vh = self.random_int(0, h - s)
                vw = self.random_int(0, w - s)
                new_deltas = torch.zeros([c, h, w]).to(self.device)
                new_deltas[:, vh:vh + s, vw:vw + s] = 2. * self.eps * self.random_choice([c, 1, 1])

                x_new = x_best_curr + new_deltas
                x_new = torch.min(torch.max(x_new, x_curr - self.eps), x_curr + self.eps)
                x_new = torch.clamp(x_new, 0., 1.)
                x_new = self.check_shape(x_new)

                margin, loss = self.margin_and_loss(x_new, y_curr)

                # update loss if new loss is better
                idx_improved = (loss < loss_min_curr).float()
                loss_min[idx_to_fool] = idx_improved * loss + (1. - idx_improved) * loss_min_curr

                # update margin and x_best if new loss is better or misclassification
                idx_miscl = (margin <= 0.).float()
                idx_improved = torch.max(idx_improved, idx_miscl)
                margin_min[idx_to_fool] = idx_improved * margin + (1. - idx_improved) * margin_min_curr
                idx_improved = idx_improved.reshape([-1, *[1] * len(x.shape[:-1])])
                x_best[idx_to_fool] = idx_improved * x_new + (1. - idx_improved) * x_best_curr
                n_queries[idx_to_fool] += 1.

                ind_succ = (margin_min <= 0.).nonzero().squeeze()
                if ind_succ.numel() == n_ex_total:
                    break
        return x_best


class ResumableFAB(_Like, FABAttack_PT):
    """:class:`pyautoattack.fab_pt.FABAttack_PT` whose targeted ``perturb`` (FAB-T) can save and resume.

    ``perturb(x, y, resume=None, checkpoint=None)``: ``checkpoint(make_state)`` is called before each target
    class and restart; ``resume`` is such a state, from which the run goes on (the caller restores the global
    random state saved with it). The untargeted attack is the library's whole run: ``checkpoint`` is not
    called, and ``resume`` is refused.
    """

    _library = FABAttack_PT

    def perturb(self, x, y, *, resume=None, checkpoint=None):
        if not self.targeted:  # the library's run, whole (checkpoint unused)
            if resume is not None:
                raise ValueError("only the targeted FAB attack (FAB-T) can resume")
            return super().perturb(x, y)
        if self.device is None:
            self.device = x.device
        with torch.no_grad():
            if resume is None:
                adv = x.clone()
                acc = self._predict_fn(x).max(1)[1] == y
                torch.random.manual_seed(self.seed)
                torch.cuda.random.manual_seed(self.seed)
                at = (2, 0)
            else:
                tensors, meta = resume
                adv, acc = tensors["adv"].to(x.device, x.dtype), tensors["acc"].to(x.device)
                at = (meta["target_class"], meta["restart"])
            for target_class in range(2, self.n_target_classes + 2):
                self.target_class = target_class
                for counter in range(self.n_restarts):
                    if (target_class, counter) < at:
                        continue
                    if checkpoint is not None:
                        checkpoint(lambda: ({"adv": adv, "acc": acc},
                                            {"target_class": target_class, "restart": counter}))
                    ind_to_fool = _to_fool(acc)
                    if ind_to_fool is None:
                        continue
                    x_to_fool, y_to_fool = x[ind_to_fool].clone(), y[ind_to_fool].clone()
                    adv_curr = self.attack_single_run(x_to_fool, y_to_fool, use_rand_start=(counter > 0),
                                                      is_targeted=True)
                    acc_curr = self._predict_fn(adv_curr).max(1)[1] == y_to_fool
                    res = _norm(x_to_fool - adv_curr, self.norm)
                    acc_curr = torch.max(acc_curr, res > self.eps)
                    ind_curr = (acc_curr == 0).nonzero().squeeze()
                    acc[ind_to_fool[ind_curr]] = 0
                    adv[ind_to_fool[ind_curr]] = adv_curr[ind_curr].clone()
        return adv


# attack_single_run's state at the start of an iteration (its other tensors only record the run's history)
# ("acc_run": the run's own flags; "acc" is the restart loop's, saved beside them)
_APGD_RUN_TENSORS = ("x_adv", "x_adv_old", "grad", "grad_best", "x_best", "x_best_adv", "loss_best", "acc_run",
                     "step_size", "loss_steps", "loss_best_last_check", "reduced_last_check")


class _ResumableAPGDRun:
    """``APGDAttack.attack_single_run``'s L-inf branch (its printing and its unread step records left out),
    saving its state before each iteration; shared by :class:`ResumableAPGD` and :class:`ResumableAPGDT`."""

    def _runs_whole(self, y, best_loss, x_init) -> bool:
        return (self.norm != "Linf" or best_loss or x_init is not None or self.use_largereps or y is None
                or y.dim() == 0)

    def _predict(self, x):
        return self.model.predict(x) if self.is_tf_model else self.model(x)

    def _criterion(self):
        if self.is_tf_model:
            table = {"ce": "get_logits_loss_grad_xent", "dlr": "get_logits_loss_grad_dlr",
                     "dlr-targeted": "get_logits_loss_grad_target"}
            return getattr(self.model, table[self.loss])
        if self.loss == "ce":
            return lambda logits, y: F.cross_entropy(logits, y, reduction="none")
        return self.dlr_loss if self.loss == "dlr" else self.dlr_loss_targeted

    def _eot_gradient(self, x_adv, y, criterion):
        """The library's EOT loop: the logits and losses of the last draw, and the mean input gradient."""
        x_adv.requires_grad_()
        grad = torch.zeros_like(x_adv)
        for _ in range(self.eot_iter):
            if not self.is_tf_model:
                with torch.enable_grad():
                    logits = self.model(x_adv)
                    loss_indiv = criterion(logits, y)
                    loss = loss_indiv.sum()
                grad += torch.autograd.grad(loss, [x_adv])[0].detach()
            else:
                args = (x_adv, y) if self.y_target is None else (x_adv, y, self.y_target)
                logits, loss_indiv, grad_curr = criterion(*args)
                grad += grad_curr
        grad /= float(self.eot_iter)
        return logits, loss_indiv, grad

    def _linf_run(self, x, y, resume, checkpoint):
        """``(x_best, acc, loss_best, x_best_adv)`` as ``attack_single_run`` returns them; ``checkpoint`` is
        called before each iteration, ``resume`` (a state it saved) goes on from there."""
        criterion = self._criterion()
        if resume is None:
            t = 2 * torch.rand(x.shape).to(self.device).detach() - 1
            x_adv = (x + self.eps * torch.ones_like(x).detach() * self.normalize(t)).clamp(0., 1.)
            x_best, x_best_adv = x_adv.clone(), x_adv.clone()
            loss_steps = torch.zeros([self.n_iter, x.shape[0]]).to(self.device)
            logits, loss_indiv, grad = self._eot_gradient(x_adv, y, criterion)
            grad_best = grad.clone()
            if self.loss in ("dlr", "dlr-targeted"):
                check_zero_gradients(grad, logger=self.logger)
            acc = logits.detach().max(1)[1] == y
            loss_best = loss_indiv.detach().clone()
            step_size = 2. * self.eps * torch.ones([x.shape[0], *([1] * self.ndims)]).to(self.device).detach()
            x_adv_old = x_adv.clone()
            k, counter3, first = self.n_iter_2 + 0, 0, 0
            loss_best_last_check = loss_best.clone()
            reduced_last_check = torch.ones_like(loss_best)
        else:
            tensors, meta = resume
            (x_adv, x_adv_old, grad, grad_best, x_best, x_best_adv, loss_best, acc, step_size, loss_steps,
             loss_best_last_check, reduced_last_check) = (tensors[name].to(self.device) for name in _APGD_RUN_TENSORS)
            k, counter3, first = meta["k"], meta["counter3"], meta["iter"]
        for i in range(first, self.n_iter):
            if checkpoint is not None:
                values = (x_adv, x_adv_old, grad, grad_best, x_best, x_best_adv, loss_best, acc, step_size,
                          loss_steps, loss_best_last_check, reduced_last_check)
                checkpoint(lambda values=values, i=i, k=k, counter3=counter3: (
                    {name: v.detach() for name, v in zip(_APGD_RUN_TENSORS, values)},
                    {"iter": i, "k": k, "counter3": counter3}))
            with torch.no_grad():
                x_adv = x_adv.detach()
                grad2 = x_adv - x_adv_old
                x_adv_old = x_adv.clone()
                a = 0.75 if i > 0 else 1.0
                x_adv_1 = x_adv + step_size * torch.sign(grad)
                x_adv_1 = torch.clamp(torch.min(torch.max(x_adv_1, x - self.eps), x + self.eps), 0.0, 1.0)
                x_adv_1 = torch.clamp(torch.min(torch.max(x_adv + (x_adv_1 - x_adv) * a + grad2 * (1 - a),
                                                          x - self.eps), x + self.eps), 0.0, 1.0)
                x_adv = x_adv_1 + 0.
            logits, loss_indiv, grad = self._eot_gradient(x_adv, y, criterion)
            pred = logits.detach().max(1)[1] == y
            acc = torch.min(acc, pred)
            ind_pred = (pred == 0).nonzero().squeeze()
            x_best_adv[ind_pred] = x_adv[ind_pred] + 0.
            with torch.no_grad():
                y1 = loss_indiv.detach().clone()
                loss_steps[i] = y1 + 0
                ind = (y1 > loss_best).nonzero().squeeze()
                x_best[ind] = x_adv[ind].clone()
                grad_best[ind] = grad[ind].clone()
                loss_best[ind] = y1[ind] + 0
                counter3 += 1
                if counter3 == k:
                    fl_oscillation = self.check_oscillation(loss_steps, i, k, loss_best, k3=self.thr_decr)
                    fl_reduce_no_impr = (1. - reduced_last_check) * (loss_best_last_check >= loss_best).float()
                    fl_oscillation = torch.max(fl_oscillation, fl_reduce_no_impr)
                    reduced_last_check = fl_oscillation.clone()
                    loss_best_last_check = loss_best.clone()
                    if fl_oscillation.sum() > 0:
                        ind_fl_osc = (fl_oscillation > 0).nonzero().squeeze()
                        step_size[ind_fl_osc] /= 2.0
                        x_adv[ind_fl_osc] = x_best[ind_fl_osc].clone()
                        grad[ind_fl_osc] = grad_best[ind_fl_osc].clone()
                    k = max(k - self.size_decr, self.n_iter_min)
                    counter3 = 0
        return x_best, acc, loss_best, x_best_adv

    def _start(self, x, y, resume, max_loss=False, attack_all=False):
        """The restart loop's starting state: ``(x, y, outer, where it resumes or None)``. ``outer`` holds the
        loop's tensors, saved with every state: ``adv`` and ``acc`` (the library's: the images still to attack,
        those its first pass got right, or with ``attack_all`` every image), and with ``max_loss`` the
        highest-loss point of every image so far (``x_max``) and its loss (``loss_max``, -inf before any run)."""
        self.init_hyperparam(x)
        x = x.detach().clone().float().to(self.device)
        y = y.detach().clone().long().to(self.device)
        if resume is None:
            y_pred = self._predict(x).max(1)[1]  # drawn with attack_all too: the random draws stay the library's
            acc = torch.ones_like(y, dtype=torch.bool) if attack_all else y_pred == y
            outer = {"adv": x.clone(), "acc": acc}
            if max_loss:
                outer.update(x_max=x.clone(), loss_max=torch.full((x.shape[0],), -math.inf, device=self.device))
            torch.random.manual_seed(self.seed)
            torch.cuda.random.manual_seed(self.seed)
            return x, y, outer, None
        tensors, meta = resume
        names = ("adv", "acc", "x_max", "loss_max") if max_loss else ("adv", "acc")
        missing = [name for name in names if name not in tensors]
        if missing:
            raise ValueError(f"resume: the saved state lacks {missing} (saved with other settings)")
        outer = {name: tensors[name].to(self.device) for name in names}
        outer.update({name: outer[name].to(x.dtype) for name in ("adv", "x_max") if name in outer})
        return x, y, outer, meta

    def _restart(self, x, y, outer, where, resume, checkpoint, before_run=None):
        """One restart on the images ``outer["acc"]`` still counts robust (``where``: its place in the loops, saved
        with each state); updates ``outer``'s tensors in place. ``before_run(x_to_fool)`` sets up a fresh run
        (APGD-T's target labels) and returns the extra tensors to save with its states."""
        adv, acc = outer["adv"], outer["acc"]
        if checkpoint is not None:
            checkpoint(lambda: (dict(outer), {**where, "iter": None}))
        ind_to_fool = _to_fool(acc)
        if ind_to_fool is None:
            return
        x_to_fool, y_to_fool = x[ind_to_fool].clone(), y[ind_to_fool].clone()
        run_resume = None
        if resume is not None and resume[1].get("iter") is not None:
            run_resume = resume
            extra = {k: v.to(self.device) for k, v in resume[0].items() if k == "y_target"}
        else:
            extra = before_run(x_to_fool) if before_run is not None else {}
        if "y_target" in extra:
            self.y_target = extra["y_target"]

        def with_outer(make):  # a run's state, with the restart loop's around it
            tensors, meta = make()
            return {**tensors, **extra, **outer}, {**meta, **where}

        inner = None if checkpoint is None else (lambda make: checkpoint(lambda: with_outer(make)))
        x_best, acc_curr, loss_best, adv_curr = self._linf_run(x_to_fool, y_to_fool, run_resume, inner)
        if "loss_max" in outer:  # the highest loss over the restarts so far
            higher = loss_best > outer["loss_max"][ind_to_fool]
            outer["x_max"][ind_to_fool[higher]] = x_best[higher].clone()
            outer["loss_max"][ind_to_fool[higher]] = loss_best[higher]
        ind_curr = (acc_curr == 0).nonzero().squeeze()
        acc[ind_to_fool[ind_curr]] = 0
        adv[ind_to_fool[ind_curr]] = adv_curr[ind_curr].clone()


class ResumableAPGD(_Like, _ResumableAPGDRun, APGDAttack):
    """:class:`pyautoattack.autopgd_base.APGDAttack` (APGD-CE, APGD-DLR) whose L-inf ``perturb`` can save and
    resume.

    ``perturb(x, y, resume=None, checkpoint=None)``: ``checkpoint(make_state)`` is called before each restart
    and each iteration; ``resume`` is such a state, from which the run goes on (the caller restores the global
    random state saved with it). Other norms, ``best_loss``, ``x_init``, the large-eps schedule and ``y=None``
    are the library's whole run: ``checkpoint`` is not called, and ``resume`` is refused.

    ``unfooled``: what comes back for an image the restarts attacked but did not fool: ``"clean"`` (the
    library's ``perturb``: the image itself) or ``"max-loss"`` (the point where the attack's own loss, on one
    draw of a randomized model, was highest). The points of the images it fooled, and
    the images its first (clean) pass already got wrong (not attacked, as in the library), are the same either
    way, and so are the random draws.
    ``attack_all``: attack those images too. The library counts them fooled by that first pass; through a
    randomized defense that pass is one draw, so an image it happened to get wrong would come back clean and
    be scored on a fresh draw, unattacked.
    """

    _library = APGDAttack

    def perturb(self, x, y=None, best_loss=False, x_init=None, *, unfooled="clean", attack_all=False, resume=None,
                checkpoint=None):
        check_bool(attack_all, "attack_all")
        if self._runs_whole(y, best_loss, x_init):
            if resume is not None or check_unfooled(unfooled) != "clean" or attack_all:
                raise ValueError("only the L-inf APGD attack with labels y, without best_loss, x_init or the "
                                 "large-eps schedule, can resume, return its highest-loss points (unfooled) or "
                                 "attack every image (attack_all)")
            return super().perturb(x, y, best_loss=best_loss, x_init=x_init)
        if self.loss not in ("ce", "dlr"):
            raise ValueError(f"APGD's loss must be 'ce' or 'dlr', got {self.loss!r}")
        max_loss = check_unfooled(unfooled) == "max-loss"
        x, y, outer, at = self._start(x, y, resume, max_loss, attack_all)
        for counter in range(at["restart"] if at else 0, self.n_restarts):
            self._restart(x, y, outer, {"restart": counter}, resume, checkpoint)
            resume = None
        if not max_loss:
            return outer["adv"]
        attacked = outer["acc"] & (outer["loss_max"] > -math.inf)  # attacked and never fooled (a NaN loss: clean)
        return torch.where(attacked.view(-1, *([1] * (x.dim() - 1))), outer["x_max"], outer["adv"])


class ResumableAPGDT(_Like, _ResumableAPGDRun, APGDAttack_targeted):
    """:class:`pyautoattack.autopgd_base.APGDAttack_targeted` (APGD-T) whose L-inf ``perturb`` can save and
    resume, before each target class, restart and iteration (as :class:`ResumableAPGD`)."""

    _library = APGDAttack_targeted

    def perturb(self, x, y=None, x_init=None, *, resume=None, checkpoint=None):
        if self._runs_whole(y, False, x_init):
            if resume is not None:
                raise ValueError("only the L-inf APGD-T attack with labels y, without x_init or the large-eps "
                                 "schedule, can resume")
            return super().perturb(x, y, x_init=x_init)
        if self.loss != "dlr-targeted":
            raise ValueError(f"APGD-T's loss must be 'dlr-targeted', got {self.loss!r}")
        x, y, outer, at = self._start(x, y, resume)
        for target_class in range(2, self.n_target_classes + 2):
            def pick(x_to_fool, t=target_class):  # the library's choice of target: the t-th most likely class
                return {"y_target": self._predict(x_to_fool).sort(dim=1)[1][:, -t]}

            for counter in range(self.n_restarts):
                if at is not None and (target_class, counter) < (at["target_class"], at["restart"]):
                    continue
                self._restart(x, y, outer, {"target_class": target_class, "restart": counter}, resume,
                              checkpoint, pick)
                resume = None
        return outer["adv"]


def _to_fool(acc: torch.Tensor) -> torch.Tensor | None:
    """The indices of the images still correct, as the library's loops take them; ``None`` when there are none."""
    ind = acc.nonzero().squeeze()
    if len(ind.shape) == 0:
        ind = ind.unsqueeze(0)
    return ind if ind.numel() else None


def _norm(d: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample size of ``d`` in FAB's norm (as ``FABAttack.perturb`` measures it)."""
    flat = d.reshape(d.shape[0], -1)
    if norm == "Linf":
        return flat.abs().max(1)[0]
    if norm == "L2":
        return (flat ** 2).sum(dim=-1).sqrt()
    return flat.abs().sum(-1)
