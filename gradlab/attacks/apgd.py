"""APGD: auto-PGD with a step-size schedule of checkpoints (Croce & Hein, ICML 2020).

"Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
attacks", Algorithm 1. From a start point x^(0) of the eps-ball (linf: ``x + eps * t / ||t||_inf``
with ``t`` uniform in [-1, 1]^D; l2: ``x + eps * t / ||t||_2`` with ``t`` Gaussian; both as in the
reference code), with step ``eta = 2 eps`` and ``P`` the projection onto the ball ∩ [0, 1]^D::

    z^(k+1) = P( x^(k) + eta * d(grad f(x^(k))) )                 d = sign (linf), g/||g||_2 (l2)
    x^(k+1) = P( x^(k) + alpha (z^(k+1) - x^(k)) + (1 - alpha)(x^(k) - x^(k-1)) )   alpha = 0.75

(alpha = 1 on the first step). At the checkpoints ``w_j = p_j N`` (``p_0 = 0``, ``p_1 = 0.22``,
``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, in the reference code's whole steps: see
:func:`checkpoints`), the step of an example is halved and its iterate restarted from its best
point when

1. at most ``rho * (w_j - w_{j-1})`` of the steps since ``w_{j-1}`` raised the loss (the
   reference code's ``<=``; the paper writes ``<``), or
2. its step was not halved at ``w_{j-1}`` and its best loss has not risen since.

The loss is the cross-entropy or the DLR loss (difference of logits ratio, Section 4)::

    DLR(z, y)   = -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)                      (untargeted)
    DLR_T(z, y) = -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)                     (target t)

with ``z_pi1 >= z_pi2 >= ...`` the sorted logits; both are invariant to shifts and scalings of the
logits. APGD-T (``targeted`` without ``target_class``) runs the targeted loss towards each of the
``n_target_classes`` most likely clean classes other than the top one in turn, and, as in the
paper, counts an example as broken when it is misclassified (so its report is untargeted).
With ``target_class`` the attack is targeted in the base's sense (success = that class).

Every run (restart or target class) attacks only the examples not yet broken; the result of an
example is the last adversarial iterate of the run that broke it, else its highest-loss point. Differences from the
reference code, both documented choices: condition 1 counts the first step against the start
point's loss (the code compares it with an unfilled zero entry), and the ball's projection
is exact for l2 (the code adds 1e-12 to the radius). Shapes: ``(B, *input_shape)`` in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from gradlab.attacks import ATTACKS
from gradlab.attacks.base import ATTACK_OPTIONS, STEPS, Attack, flat_norm, per_example
from gradlab.core.errors import GradlabError
from gradlab.core.losses import per_example_loss
from gradlab.core.options import Option, Options

LOSSES = ("ce", "dlr")

OPTIONS = ATTACK_OPTIONS.without("targeted") + Options(
    Option("targeted", bool, False, "APGD-T: the targeted loss towards each of the top n_target_classes classes in "
           "turn, success = misclassified (with target_class: that class only, success = the target)",
           paper="Croce & Hein 2020"),
    replace(STEPS, default=100),
    Option("loss", str, "ce", "objective: cross-entropy or the DLR loss (difference of logits ratio)",
           choices=LOSSES, paper="Croce & Hein 2020"),
    Option("restarts", int, 1, "runs from random starts, each on the examples still robust", low=1),
    Option("n_target_classes", int, 9, "APGD-T: target classes, the most likely clean ones after the top one", low=1),
    Option("rho", float, 0.75, "checkpoint condition 1: halve the step when at most this fraction of the steps "
           "since the last checkpoint raised the loss", low=0, high=1),
    Option("momentum", float, 0.75, "weight alpha of the new step against the previous one", low=0, high=1),
)


def checkpoints(n_iter: int) -> list[int]:
    """Iterations ``w_j`` (1-based counts of steps) where the step-size conditions are checked.

    ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, as integer step
    counts the way the reference code rounds them (``int(0.22 N)``, ``int(0.03 N)``, ``int(0.06 N)``,
    each at least 1).
    """
    length, shrink, least = max(int(0.22 * n_iter), 1), max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1)
    out, w = [], 0
    while w + length <= n_iter:
        w += length
        out.append(w)
        length = max(length - shrink, least)
    return out


def dlr_loss(z: Tensor, y: Tensor) -> Tensor:
    """Untargeted DLR loss ``(B, C), (B,) -> (B,)`` (needs C >= 3)."""
    zs, idx = z.sort(dim=1)
    zy = z.gather(1, y[:, None])[:, 0]
    top_is_y = idx[:, -1] == y
    other = torch.where(top_is_y, zs[:, -2], zs[:, -1])  # max over i != y
    return -(zy - other) / (zs[:, -1] - zs[:, -3] + 1e-12)


def dlr_targeted_loss(z: Tensor, y: Tensor, t: Tensor) -> Tensor:
    """Targeted DLR loss towards ``t`` ``(B, C), (B,), (B,) -> (B,)`` (needs C >= 4)."""
    zs, _ = z.sort(dim=1)
    zy = z.gather(1, y[:, None])[:, 0]
    zt = z.gather(1, t[:, None])[:, 0]
    return -(zy - zt) / (zs[:, -1] - 0.5 * (zs[:, -3] + zs[:, -4]) + 1e-12)


@ATTACKS.register(
    "apgd",
    "auto-PGD: step-size checkpoints, momentum, CE or DLR loss, APGD-T over the top classes (Croce & Hein 2020)",
    options=OPTIONS,
    paper="Croce & Hein 2020",
)
class APGD(Attack):
    """Auto-PGD; see the module docstring. Options: :data:`OPTIONS`."""

    name = "apgd"
    options = OPTIONS
    cycles_top_classes = True  # --targeted without --target-class: APGD-T over the top classes
    # every option of OPTIONS is an attribute (set by Attack.__init__)

    # ----------------------------------------------------------------------- the runs ----------
    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            clean = self.logits(x)
        self._check_classes(clean.shape[1])
        out = x.clone()
        robust = ~self.is_adversarial(clean)
        best_loss = torch.full((x.shape[0],), -math.inf, device=x.device, dtype=x.dtype)
        # Each run: (target classes or None); APGD-T takes the k-th most likely clean class.
        if self.multi_target:
            order = clean.argsort(dim=1, descending=True)
            runs = [order[:, k] for k in range(1, min(self.n_target_classes, clean.shape[1] - 1) + 1)]
        else:
            runs = [self.target]
        for target in runs:
            for _ in range(self.restarts):
                idx = robust.nonzero()[:, 0]
                if idx.numel() == 0:
                    return out
                t = None if target is None else target[idx]
                x_best, loss_best, fooled, x_fooled = self.run_once(x[idx], y[idx], t)
                keep = (loss_best > best_loss[idx]) & ~fooled
                out[idx[keep]] = x_best[keep]
                best_loss[idx[keep]] = loss_best[keep]
                out[idx[fooled]] = x_fooled[fooled]
                robust[idx[fooled]] = False
        return out

    def run_once(self, x: Tensor, y: Tensor, t: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One APGD trajectory of ``steps`` steps on ``x`` ``(b, ...)`` with labels ``y`` ``(b,)``.

        ``t`` holds target classes (``(b,)``) for a targeted loss, else ``None``.
        Returns ``(x_best, loss_best, fooled, x_fooled)``: the highest-loss point and its loss,
        whether an adversarial iterate was found ``(b,)`` and the last such iterate.
        """
        loss_fn, success = self._loss_and_success(y, t)
        seen: dict = {}

        def tracked(z: Tensor) -> Tensor:
            seen["logits"] = z.detach()
            return loss_fn(z)

        def gradient(at: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            g, loss = self.input_grad(at, tracked)
            if self.eot > 1 or self.eot_noise > 0:  # success is judged on the deterministic model
                with torch.no_grad():
                    seen["logits"] = self.logits(at)
            return g, loss, success(seen["logits"])

        proj, direction = self._geometry(x)
        x_adv = proj(self._start(x))
        g, loss, fooled = gradient(x_adv)
        x_fooled = x_adv.clone()
        x_best, g_best, loss_best = x_adv.clone(), g.clone(), loss.clone()
        step = torch.full((x.shape[0],), 2.0 * self.eps, device=x.device, dtype=x.dtype)
        history = [loss]  # f(x^(0)), f(x^(1)), ...: condition 1 counts rises along it
        marks = set(checkpoints(self.steps))
        last_mark, best_at_mark = 0, loss_best.clone()
        halved_at_mark = torch.ones_like(fooled)  # condition 2 is off at the first checkpoint
        x_prev = x_adv
        for i in range(self.steps):
            a = self.momentum if i > 0 else 1.0
            with torch.no_grad():
                z = proj(x_adv + per_example(step, x_adv) * direction(g))
                x_new = proj(x_adv + a * (z - x_adv) + (1 - a) * (x_adv - x_prev))
            x_prev, x_adv = x_adv, x_new
            g, loss, now = gradient(x_adv)
            # masked selects, not boolean indexing: indexing by a mask reads its count back to
            # the host, a device synchronisation per step
            x_fooled = torch.where(per_example(now, x_adv), x_adv, x_fooled)
            fooled |= now
            up = loss > loss_best
            pick = per_example(up, x_adv)
            x_best, g_best = torch.where(pick, x_adv, x_best), torch.where(pick, g, g_best)
            loss_best = torch.where(up, loss, loss_best)
            history.append(loss)
            if i + 1 in marks:
                window = torch.stack(history[last_mark:])  # (h + 1, b)
                rises = (window[1:] > window[:-1]).sum(dim=0)
                cond1 = rises <= self.rho * (i + 1 - last_mark)
                cond2 = ~halved_at_mark & (best_at_mark >= loss_best)
                halve = cond1 | cond2
                step = torch.where(halve, step / 2, step)
                x_adv = torch.where(per_example(halve, x_adv), x_best, x_adv)
                g = torch.where(per_example(halve, g), g_best, g)
                halved_at_mark, best_at_mark, last_mark = halve, loss_best.clone(), i + 1
        return x_best, loss_best, fooled, x_fooled

    # ----------------------------------------------------------------------- pieces ------------
    def _geometry(self, x: Tensor) -> tuple[Callable, Callable]:
        """``(proj, direction)`` of a run on the clean rows ``x``: the projection onto the eps-ball
        ∩ [0, 1] and the step direction (:mod:`gradlab.attacks.manifold` confines both to a subspace)."""
        if self.norm != "linf":
            return (lambda v: self.project(v, x)), self.step_direction
        lo, hi = (x - self.eps).clamp_min(0.0), (x + self.eps).clamp_max(1.0)
        return (lambda v: torch.minimum(torch.maximum(v, lo), hi)), self.step_direction

    def _start(self, x: Tensor) -> Tensor:
        """The reference code's start point: a random point on the eps-sphere's scale, then [0, 1]."""
        gen = self.generator
        if self.norm == "linf":
            t = 2 * torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) - 1
        else:
            t = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        scale = flat_norm(t, self.norm).to(x.dtype).clamp_min(1e-12)
        return (x + self.eps * t / per_example(scale, t)).clamp(0.0, 1.0)

    def _loss_and_success(self, y: Tensor, t: Optional[Tensor]) -> tuple[Callable, Callable]:
        """Per-example loss ``logits -> (b,)`` and success test ``logits -> (b,) bool`` of one run."""
        if t is None:
            # "ce": the run's loss (self.criterion, cross-entropy unless it trained with --loss mse)
            loss = (lambda z: per_example_loss(self.criterion)(z, y)) if self.loss == "ce" else (lambda z: dlr_loss(z, y))
        elif self.loss == "ce":
            loss = lambda z: -per_example_loss(self.criterion)(z, t)  # noqa: E731
        else:
            loss = lambda z: dlr_targeted_loss(z, y, t)  # noqa: E731
        if self.targeted:  # a fixed target class: success means reaching it
            return loss, lambda z: z.argmax(dim=1) == t
        return loss, lambda z: z.argmax(dim=1) != y

    def _check_classes(self, n_classes: int) -> None:
        need = 4 if (self.loss == "dlr" and (self.targeted or self.multi_target)) else 3 if self.loss == "dlr" else 2
        if n_classes < need:
            raise GradlabError(f"loss {self.loss!r} needs at least {need} classes, the model has {n_classes}; use loss 'ce'")
