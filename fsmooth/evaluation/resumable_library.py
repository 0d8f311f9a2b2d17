"""pyautoattack's Square and FAB-T attacks, able to stop part-way and go on later with the same points.

Square's 5,000 queries are each a forward through the defense for every image not yet fooled, and FAB-T runs
100 iterations for each of 9 target classes: on one CPU core a chunk takes hours, on a GPU more than a device
call. :class:`ResumableSquare` runs the library's L-inf loop (pyautoattack 0.2.0's ``SquareAttack.perturb`` and
``attack_single_run``) draw for draw and hands its state to a ``checkpoint`` before each query;
:class:`ResumableFAB` runs ``FABAttack.perturb``'s targeted loop and does so before each target class. ``resume``
goes on from such a state (the caller restores the global random state saved with it: the attacks and the
defense's noise draw from it). The points equal the library's (``tests/test_evaluation_resumable_library.py``).
"""
from __future__ import annotations

import math

import torch
from pyautoattack.fab_pt import FABAttack_PT
from pyautoattack.square import SquareAttack

__all__ = ["ResumableFAB", "ResumableSquare"]


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
