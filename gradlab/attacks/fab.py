"""FAB and FAB-T: the fast adaptive boundary attack (Croce & Hein, ICML 2020b).

"Minimally distorted adversarial examples with a fast adaptive boundary attack". At the iterate
``x^(i)`` the decision boundary between a class ``l`` and the label ``y`` is linearised::

    pi(z):  f_l(x^(i)) - f_y(x^(i)) + w . (z - x^(i)) = 0,      w = grad (f_l - f_y)(x^(i))

with ``l`` the class of the closest linearised boundary (untargeted; one gradient per class),
or, in FAB-T (``targeted``, the form AutoAttack runs, Croce & Hein 2020 Section 5), the target:
in turn each of the ``n_target_classes`` most likely clean classes after the top one (success =
misclassified, as in the paper), or ``target_class`` alone (success = that class; the boundary
is then the one between ``t`` and the strongest other class at the iterate).

and both the iterate and the clean input are projected onto ``pi ∩ [0, 1]^D`` in the attack's
norm (:func:`project_hyperplane_box`, exact), giving steps ``d_i`` and ``d_0``. With
``a = min(||d_i|| / (||d_i|| + ||d_0||), alpha_max)`` the next iterate is the convex combination::

    x^(i+1) = clip_[0,1]( (1 - a) (x^(i) + eta d_i) + a (x + eta d_0) )

which leans towards the clean input, so the iterate tracks the *closest* boundary point. Once
``x^(i+1)`` is misclassified it is stored if it is the smallest perturbation so far and pulled
back, ``x^(i+1) <- x + beta (x^(i+1) - x)``. Restarts after the first start at a random point at
half the distance of the best adversarial found (at most eps). An example counts as broken once
its smallest adversarial lies within eps; for the others the result is the eps-ball's projection of the best point, which may still fool the
model. With ``eot > 1`` the boundary's normal is the EOT-averaged gradient (success is judged on
the deterministic model). Shapes: ``(B, *input_shape)`` in [0, 1]; eps in pixel units.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor

from gradlab.attacks import ATTACKS
from gradlab.attacks.base import ATTACK_OPTIONS, STEPS, flat_norm, per_example
from gradlab.attacks.minnorm import MinimumNormAttack
from gradlab.core.options import Option, Options

OPTIONS = ATTACK_OPTIONS.without("targeted") + Options(
    Option("targeted", bool, False, "FAB-T: towards each of the top n_target_classes classes in turn, success = "
           "misclassified (with target_class: that class only, success = the target); false: the closest boundary",
           paper="Croce & Hein 2020"),
    replace(STEPS, default=100),
    Option("n_target_classes", int, 9, "FAB-T: target classes, the most likely clean ones after the top one", low=1),
    Option("restarts", int, 1, "runs per target class; after the first, from random starts", low=1),
    Option("alpha_max", float, 0.1, "largest weight of the step from the clean input", low=0, high=1,
           paper="Croce & Hein 2020b"),
    Option("eta", float, 1.05, "overshoot of each projection step", low=1, paper="Croce & Hein 2020b"),
    Option("beta", float, 0.9, "pull-back towards the clean input after a success", low=0, high=1,
           paper="Croce & Hein 2020b"),
)


def project_hyperplane_box(w: Tensor, c: Tensor, lo: Tensor, hi: Tensor, norm: str) -> Tensor:
    """Smallest ``delta`` (in ``norm``) with ``w . delta = c`` and ``lo <= delta <= hi``, row by row.

    Args:
        w: ``(B, D)`` normals; c: ``(B,)`` offsets; lo, hi: ``(B, D)`` box with ``lo <= 0 <= hi``.
        norm: ``"linf"`` or ``"l2"``.
    Returns:
        ``(B, D)``. The minimiser is ``clip(lam * d, lo, hi)`` with ``d = sign(w)`` (linf) or
        ``d = w`` (l2) (KKT conditions); ``w . delta`` is piecewise linear and nondecreasing in
        ``lam``, so its breakpoints are sorted and the segment reaching ``c`` is solved exactly.
        When the box cannot reach the hyperplane every coordinate is saturated towards it.
    """
    s = torch.where(c < 0, -1.0, 1.0).to(w.dtype)
    w = w * s[:, None]
    c = c.abs() * (c != 0)
    d = w.sign() if norm == "linf" else w
    bound = torch.where(d > 0, hi, -lo)  # (B, D) >= 0: how far each coordinate may move along d
    rate = (w * d).abs()  # slope of w . delta in lam while the coordinate is free
    free = d != 0
    big = torch.finfo(w.dtype).max / 4
    bp = torch.where(free, bound / d.abs().clamp_min(torch.finfo(w.dtype).tiny), big)  # saturation points
    bp, order = bp.sort(dim=1)
    rate_s = rate.gather(1, order)
    sat_s = (w.abs() * bound).gather(1, order) * free.gather(1, order)
    done = sat_s.cumsum(dim=1)  # sum of saturated contributions up to and including k
    left = rate_s.sum(dim=1, keepdim=True) - rate_s.cumsum(dim=1)  # slope after k
    g = done + bp * left  # w . delta at lam = bp_k
    reach = g >= c[:, None]
    k = reach.int().argmax(dim=1)  # first breakpoint at or beyond c
    feasible = reach.any(dim=1)
    prev_done = torch.where(k > 0, done.gather(1, (k - 1).clamp_min(0)[:, None])[:, 0], torch.zeros_like(c))
    prev_left = torch.where(k > 0, left.gather(1, (k - 1).clamp_min(0)[:, None])[:, 0], rate_s.sum(dim=1))
    lam = (c - prev_done) / prev_left.clamp_min(torch.finfo(w.dtype).tiny)
    lam = torch.where(feasible, lam, bp.masked_fill(bp >= big, 0).amax(dim=1))
    return torch.minimum(torch.maximum(lam[:, None] * d, lo), hi)


@ATTACKS.register(
    "fab",
    "FAB-T: targeted fast adaptive boundary attack, minimum-norm, linf or l2 (Croce & Hein 2020b)",
    options=OPTIONS,
    paper="Croce & Hein 2020b",
)
class FAB(MinimumNormAttack):
    """Targeted FAB; see the module docstring. Options: :data:`OPTIONS`.

    As a minimum-norm attack (:meth:`minimum_norm`, the sweep of ``gradlab attack fab``) every
    target class and restart runs on every example and the smallest adversarial is kept; a call
    at a budget (AutoAttack's member) stops with an example once it is broken within eps.
    """

    name = "fab"
    options = OPTIONS
    cycles_top_classes = True  # --targeted without --target-class: FAB-T over the top classes
    # every option of OPTIONS is an attribute (set by Attack.__init__)

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        return self._runs(x, y, stop_within_eps=True)

    def search(self, x: Tensor, y: Tensor) -> Tensor:
        return self._runs(x, y, stop_within_eps=False)

    def _runs(self, x: Tensor, y: Tensor, stop_within_eps: bool) -> Tensor:
        with torch.no_grad():
            clean = self.logits(x)
        robust = ~self.is_adversarial(clean)
        best = x.clone()
        dist = torch.full((x.shape[0],), math.inf, device=x.device, dtype=torch.float64)
        if self.multi_target:
            order = clean.argsort(dim=1, descending=True)
            runs = [order[:, k] for k in range(1, min(self.n_target_classes, clean.shape[1] - 1) + 1)]
        else:
            runs = [self.target]  # None: untargeted, the closest boundary at every step
        for target in runs:
            for r in range(self.restarts):
                idx = robust.nonzero()[:, 0]
                if idx.numel() == 0:
                    return best
                t = None if target is None else target[idx]
                adv, d = self.run_once(x[idx], y[idx], t, dist[idx], random_start=r > 0)
                closer = d < dist[idx]
                best[idx[closer]] = adv[closer]
                dist[idx[closer]] = d[closer]
                if stop_within_eps:
                    robust[idx[closer & (d <= self.eps * (1 + 1e-6))]] = False
        return best

    def _boundary(self, x1: Tensor, y: Tensor, t: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """Normal ``w`` ``(b, D)`` and gap ``f_l - f_y`` ``(b,)`` of the boundary to aim at.

        FAB-T: ``l = t`` against ``y``; with ``target_class``, ``t`` against the strongest other
        class at ``x1`` (crossing only the boundary to ``y`` need not make ``t`` win). Untargeted: per example the class whose linearised boundary is the
        closest, ``argmin_l |f_l - f_y| / ||grad (f_l - f_y)||_*`` (dual norm: l1 for linf, l2
        for l2), from one gradient per class.
        """
        b = x1.shape[0]
        rows = torch.arange(b, device=x1.device)
        if t is not None:
            ref = y
            if self.targeted:  # reaching t means beating every class: aim at t against the strongest other one
                with torch.no_grad():
                    ref = self.logits(x1).scatter(1, t[:, None], -math.inf).argmax(dim=1)
            g, df = self.input_grad(x1, lambda z: z[rows, t] - z[rows, ref])
            return g.reshape(b, -1), df
        with torch.no_grad():
            n_classes = self.logits(x1[:1]).shape[1]
        best_w, best_df = None, None
        best_dist = torch.full((b,), math.inf, device=x1.device, dtype=x1.dtype)
        for cls in range(n_classes):
            g, df = self.input_grad(x1, lambda z: z[:, cls] - z[rows, y])
            w = g.reshape(b, -1)
            dual = w.abs().sum(dim=1) if self.norm == "linf" else w.norm(dim=1)
            dist = torch.where(y == cls, math.inf, df.abs() / (dual + 1e-12))
            take = dist < best_dist
            best_w = w if best_w is None else torch.where(take[:, None], w, best_w)
            best_df = df if best_df is None else torch.where(take, df, best_df)
            best_dist = torch.where(take, dist, best_dist)
        return best_w, best_df

    def run_once(self, x: Tensor, y: Tensor, t: Optional[Tensor], dist: Tensor,
                 random_start: bool) -> tuple[Tensor, Tensor]:
        """One FAB run (towards targets ``t`` ``(b,)``, or untargeted when ``None``).

        Returns ``(x_adv, norm)``: the smallest adversarial found and its norm (``inf`` where none).
        """
        b = x.shape[0]
        flat0 = x.reshape(b, -1)
        x1 = self._start(x, dist) if random_start else x.clone()
        best = x.clone()
        best_d = torch.full((b,), math.inf, device=x.device, dtype=torch.float64)
        for _ in range(self.steps):
            w, df = self._boundary(x1, y, t)  # f_l - f_y: positive beyond the boundary
            p = x1.reshape(b, -1)
            # the linearised boundary w . z = w . x1 - df, from the iterate and from the clean input
            d1 = project_hyperplane_box(w, -df, -p, 1 - p, self.norm)
            d0 = project_hyperplane_box(w, (w * (p - flat0)).sum(dim=1) - df, -flat0, 1 - flat0, self.norm)
            n1 = flat_norm(d1, self.norm).to(x.dtype).clamp_min(1e-8)
            n0 = flat_norm(d0, self.norm).to(x.dtype).clamp_min(1e-8)
            a = per_example((n1 / (n1 + n0)).clamp(0, self.alpha_max), x)
            x1 = ((1 - a) * (x1 + self.eta * d1.reshape(x.shape)) + a * (x + self.eta * d0.reshape(x.shape))).clamp(0, 1)
            with torch.no_grad():
                pred = self.logits(x1).argmax(dim=1)
            fooled = pred == t if self.targeted else pred != y
            if fooled.any():
                n = flat_norm(x1 - x, self.norm)
                closer = fooled & (n < best_d)
                best[closer] = x1[closer]
                best_d = torch.where(closer, n, best_d)
                x1 = torch.where(per_example(fooled, x1), x + self.beta * (x1 - x), x1)
        return best, best_d

    def _start(self, x: Tensor, dist: Tensor) -> Tensor:
        """A random point at half of min(best distance so far, eps) from ``x`` (the reference's restart)."""
        gen = self.generator
        if self.norm == "linf":
            t = 2 * torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) - 1
        else:
            t = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        radius = dist.clamp(max=self.eps).to(x.dtype)
        t = t / per_example(flat_norm(t, self.norm).to(x.dtype).clamp_min(1e-12), t)
        return (x + 0.5 * per_example(radius, t) * t).clamp(0.0, 1.0)
