"""PGD: projected gradient descent on the negative loss (Madry et al., ICLR 2018).

From a start point (the clean input, or with ``random_start`` a uniform point of the eps-ball),
``steps`` iterations of::

    x_{t+1} = Proj_{B_eps(x) ∩ [0,1]^D}( x_t + alpha * d(grad_x L(x_t, y)) )

with ``d(g) = sign(g)`` for linf and ``g / ||g||_2`` for l2 (Madry et al.'s l2 variant). The step
``alpha`` defaults to ``2.5 * eps / steps`` (Madry et al.'s choice: the iterate can travel from one
side of the ball to the other). ``restarts`` runs the whole iteration that many times; restart 0
starts from the clean input unless ``random_start``, later restarts always start at random, and per
example the worst case is kept: an adversarial result beats a non-adversarial one, and among equals
the higher loss wins. Shapes: ``(B, *input_shape)`` in [0, 1]; eps and alpha in pixel units.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from gradlab.attacks import ATTACKS
from gradlab.attacks.base import ALPHA, ATTACK_OPTIONS, STEPS, Attack, per_example
from gradlab.core.options import Option, Options

OPTIONS = ATTACK_OPTIONS + Options(
    replace(STEPS, default=10),
    ALPHA,
    Option("restarts", int, 1, "independent runs; the worst case per example is kept", low=1),
    Option("random_start", bool, True, "start restart 0 at a uniform point of the eps-ball instead of at x",
           paper="Madry et al. 2018"),
)


@ATTACKS.register(
    "pgd",
    "projected gradient descent, linf or l2, random start and restarts (Madry et al. 2018)",
    options=OPTIONS,
    paper="Madry et al. 2018",
)
class PGD(Attack):
    """Iterative attack; see the module docstring. Options: :data:`OPTIONS`."""

    name = "pgd"
    trainable = True
    options = OPTIONS
    steps: int
    alpha: float
    restarts: int
    random_start: bool

    def __init__(self, model, eps: float, **opts):
        super().__init__(model, eps, **opts)
        if self.alpha is None:
            self.alpha = 2.5 * self.eps / self.steps

    def run_once(self, x: Tensor, start_random: bool) -> Tensor:
        """One PGD trajectory from ``x`` (or a random point of its ball); returns the last iterate."""
        x_adv = self.random_point(x) if start_random else x.clone()
        for _ in range(self.steps):
            g, _ = self.grad(x_adv)
            x_adv = self.project(torch.add(x_adv, self.step_direction(g), alpha=self.alpha))
        return x_adv

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        best = self.run_once(x, self.random_start)
        if self.restarts == 1:
            return best
        best_adv, best_obj = self.score(best)
        for _ in range(1, self.restarts):
            cand = self.run_once(x, True)
            adv, obj = self.score(cand)
            take = self.better(adv, obj, best_adv, best_obj)
            best = torch.where(per_example(take, best), cand, best)
            best_adv = torch.where(take, adv, best_adv)
            best_obj = torch.where(take, obj, best_obj)
        return best
