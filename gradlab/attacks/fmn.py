"""FMN: the fast minimum-norm attack (Pintor, Roli, Brendel & Biggio, NeurIPS 2021), L0/L1/L2/Linf.

"Fast minimum-norm adversarial attacks through adaptive norm constraints", Algorithm 1. The
perturbation ``delta`` (from 0) ascends the loss ``-margin`` (untargeted: ``margin = Z_y -
max_{i != y} Z_i``; targeted: ``max_{i != t} Z_i - Z_t``; adversarial when ``margin < 0``) by
normalised gradient steps inside an l_p ball whose radius eps_k adapts::

    not adversarial, none found yet:  eps_k = ||delta|| + |margin| / ||grad||_q    (q: dual norm)
    not adversarial, one found:       eps_k = eps_(k-1) (1 + gamma_k)
    adversarial:                      eps_k = min(eps_(k-1) (1 - gamma_k), ||delta*||)
    delta <- P_eps_k(delta + alpha_k grad / ||grad||_2),  then x + delta clipped to [0, 1]

with ``delta*`` the smallest adversarial perturbation so far (the result) and eps capped by the
norm of the largest perturbation the box allows. One deviation: before the first adversarial
point eps also grows at least by the factor ``1 + gamma_k`` per step. The linear estimate alone
can creep up to the boundary from inside without crossing it (on the digits MLP of the tests it
found adversarials for 3 of 100 examples in 100 L2 steps; with the floor, all of them). L0 (``eps`` counts features) moves by whole
features instead: ``floor(eps (1 -+ gamma))`` or one less/more, whichever moves further, from
``eps_0 = 1``. Both ``alpha_k`` (from ``alpha_init`` to ``alpha_init / 100``) and ``gamma_k``
(from ``gamma_init`` to ``gamma_final``) follow a cosine annealing over the steps; the
projections ``P`` are those of :mod:`gradlab.attacks.projections` (l1: Duchi et al. 2008).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from gradlab.attacks import ATTACKS
from gradlab.attacks.base import ATTACK_OPTIONS, STEPS, flat_norm, per_example
from gradlab.attacks.minnorm import MinimumNormAttack
from gradlab.attacks.projections import project_ball
from gradlab.core.budgets import ALL_NORMS
from gradlab.core.options import Option, Options

OPTIONS = ATTACK_OPTIONS.without("norm") + Options(
    Option("norm", str, "l2", "the norm minimised (l0: the number of changed input features)", choices=ALL_NORMS),
    replace(STEPS, default=100),
    Option("alpha_init", float, 1.0, "first step size (cosine-annealed to alpha_init / 100)", low=0, low_open=True,
           paper="Pintor et al. 2021"),
    Option("gamma_init", float, 0.05, "first relative change of the norm bound eps", low=0, high=1, low_open=True,
           high_open=True, paper="Pintor et al. 2021"),
    Option("gamma_final", float, 0.001, "last relative change of eps (cosine annealing)", low=0, high=1,
           high_open=True, paper="Pintor et al. 2021"),
)

DUAL = {"linf": "l1", "l2": "l2", "l1": "linf"}


def cosine(start: float, end: float, k: int, steps: int) -> float:
    """The annealed value at step ``k`` of ``steps``: ``end + (start - end) (1 + cos(pi k / steps)) / 2``."""
    return end + (start - end) * (1 + math.cos(math.pi * k / steps)) / 2


@ATTACKS.register("fmn", "fast minimum-norm attack: adaptive norm ball, l0, l1, l2 or linf",
                  options=OPTIONS, paper="Pintor et al. 2021")
class FMN(MinimumNormAttack):
    """FMN; see the module docstring. Options: :data:`OPTIONS`."""

    name = "fmn"
    options = OPTIONS

    def _margin(self, z: Tensor) -> Tensor:
        cls = self.target if self.targeted else self._y
        own = z.gather(1, cls[:, None])[:, 0]
        other = z.scatter(1, cls[:, None], -math.inf).amax(dim=1)
        return other - own if self.targeted else own - other

    def search(self, x: Tensor, y: Tensor) -> Tensor:
        b = x.shape[0]
        p = self.norm
        worst = flat_norm(torch.maximum(x, 1 - x), p).to(x.dtype)  # the largest perturbation the box allows
        eps = torch.ones(b, device=x.device, dtype=x.dtype) if p == "l0" else torch.full_like(worst, math.inf)
        best_n = torch.full((b,), math.inf, device=x.device, dtype=x.dtype)
        best = x.clone()
        found = torch.zeros(b, dtype=torch.bool, device=x.device)
        delta = torch.zeros_like(x)
        for k in range(self.steps):
            alpha = cosine(self.alpha_init, self.alpha_init / 100, k, self.steps)
            gamma = cosine(self.gamma_init, self.gamma_final, k, self.steps)
            kept = []

            def loss(z: Tensor) -> Tensor:
                kept.append(z.detach())
                return -self._margin(z)

            g, obj = self.input_grad(x + delta, loss)
            with torch.no_grad():
                z = kept[-1] if self.eot == 1 and self.eot_noise == 0 else self.logits(x + delta)
            n = flat_norm(delta, p).to(x.dtype)
            adv = self._margin(z) < 0
            smaller = adv & (n < best_n)
            best_n = torch.where(smaller, n, best_n)
            best = torch.where(per_example(smaller, x), x + delta, best)
            found |= adv
            if p == "l0":
                eps = torch.where(adv, torch.minimum(torch.minimum(eps - 1, (eps * (1 - gamma)).floor()), best_n),
                                  torch.maximum(eps + 1, (eps * (1 + gamma)).floor())).clamp_min(0)
            else:
                to_boundary = obj.abs() / flat_norm(g, DUAL[p]).to(x.dtype).clamp_min(1e-12)
                grow = torch.where(torch.isfinite(eps), torch.maximum(n + to_boundary, eps * (1 + gamma)), n + to_boundary)
                eps = torch.where(adv, torch.minimum(eps * (1 - gamma), best_n),
                                  torch.where(found, eps * (1 + gamma), grow))
            eps = torch.minimum(eps, worst)
            step = g / per_example(flat_norm(g, "l2").to(x.dtype).clamp_min(1e-12), g)
            delta = project_ball(delta + alpha * step, eps, p)
            delta = (x + delta).clamp(0, 1) - x
        with torch.no_grad():  # the last iterate is a candidate too
            n = flat_norm(delta, p).to(x.dtype)
            smaller = (self._margin(self.logits(x + delta)) < 0) & (n < best_n)
        return torch.where(per_example(smaller, x), x + delta, best)
