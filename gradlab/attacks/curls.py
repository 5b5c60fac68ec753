"""Curls & Whey (Shi, Wang & Han, "Curls & Whey: Boosting Black-Box Adversarial Attacks", CVPR 2019).

Shi et al. observe that iterative attacks climb the loss monotonically (and get stuck on plateaus
or behind local bumps) and that their results carry much superfluous noise. They add a *curls*
iteration, whose trajectory first goes *down* the loss and then up, to reach the decision boundary
from another side, and a *whey* optimisation that removes noise while the example stays
adversarial. gradlab implements the white-box version of both ideas as follows (batched, every
iterate projected onto the eps-ball of the attack's norm and [0, 1]):

Curls (two trajectories of ``steps`` iterations from the clean ``x``, step ``alpha``, default
``2.5 * eps / steps``, direction ``dir`` = sign for linf, unit-l2 gradient for l2):

* ascent: ``x_{t+1} = P(x_t + alpha * dir(g_t))`` (iterative FGSM / PGD without random start);
* curls: ``x_{t+1} = P(x_t - alpha * dir(g_t))`` for the first ``descent_steps`` iterations
  (default ``steps // 4``), then ascent as above.

At every iterate, an example that becomes adversarial for the first time on that trajectory gets a
binary search (``search_steps``, default 10) for the smallest ``s`` in (0, 1] with
``x + s (x_t - x)`` still adversarial; of all points found (both trajectories, every example) the
one with the smallest l2 perturbation is kept. An example already adversarial at ``x`` (misclassified
clean input) keeps ``x``. An example that never becomes adversarial gets the ascent trajectory's
last iterate (the highest-loss point, so robust accuracy is still measured against a PGD-like
attack).

Whey (only on adversarial examples; each move is accepted per example only if the example stays
adversarial under the eval-mode model; every move shrinks |delta| elementwise, so the budget and
[0, 1] hold by convexity):

1. group dropping: sort the entries of ``delta`` by magnitude into ``whey_groups`` (default 16)
   equal groups; from the smallest to the largest, try setting a group to zero;
2. squeezing: ``whey_rounds`` (default 20) rounds, each halving a random half of the entries;
3. a final binary search for the smallest uniform scale ``s`` in (0, 1] of what is left.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from gradlab.attacks import ATTACKS
from gradlab.attacks.base import ALPHA, ATTACK_OPTIONS, STEPS, Attack, flat_norm, per_example
from gradlab.core.errors import GradlabError
from gradlab.core.options import Option, Options

OPTIONS = ATTACK_OPTIONS + Options(
    replace(STEPS, default=20),
    ALPHA,
    Option("descent_steps", int, None, "leading descent iterations of the curls trajectory (unset: steps // 4)",
           low=0),
    Option("search_steps", int, 10, "bisection steps of each binary search for the boundary", low=0),
    Option("whey_groups", int, 16, "magnitude groups of the perturbation tried for dropping (0 skips)", low=0),
    Option("whey_rounds", int, 20, "rounds that halve a random half of the perturbation (0 skips)", low=0),
)


@ATTACKS.register(
    "curls",
    "Curls & Whey: descend-then-ascend trajectories, then squeeze out superfluous noise (Shi et al. 2019)",
    options=OPTIONS,
    paper="Shi et al. 2019",
)
class CurlsWhey(Attack):
    """Curls iteration + whey optimisation; see the module docstring for the exact method.
    Options: :data:`OPTIONS`."""

    name = "curls"
    options = OPTIONS
    steps: int
    alpha: float
    descent_steps: int
    search_steps: int
    whey_groups: int
    whey_rounds: int

    def __init__(self, model, eps: float, **opts):
        super().__init__(model, eps, **opts)
        if self.alpha is None:
            self.alpha = 2.5 * self.eps / self.steps
        if self.descent_steps is None:
            self.descent_steps = self.steps // 4
        elif self.descent_steps >= self.steps:
            raise GradlabError(f"invalid descent_steps: {self.descent_steps} (must be in 0..steps-1 = {self.steps - 1})")

    # ------------------------------------------------------------------ pieces --------------
    def _shrink_search(self, x0: Tensor, delta: Tensor, idx: Tensor) -> Tensor:
        """Smallest ``s`` in (0, 1] (to bisection precision) with ``x0 + s delta`` adversarial.

        ``x0 + delta`` must be adversarial for rows ``idx`` of the batch; returns ``s * delta``.
        """
        lo = torch.zeros(delta.shape[0], device=delta.device, dtype=delta.dtype)
        hi = torch.ones_like(lo)
        for _ in range(self.search_steps):
            mid = (lo + hi) / 2
            adv, _ = self.score(x0 + per_example(mid, delta) * delta, idx)
            hi = torch.where(adv, mid, hi)
            lo = torch.where(adv, lo, mid)
        return per_example(hi, delta) * delta

    def _trajectory(self, x: Tensor, descent: int, best: Tensor, best_l2: Tensor, found: Tensor, adv0: Tensor) -> Tensor:
        """Run one trajectory, updating ``best``/``best_l2``/``found`` in place; returns its end."""
        x_t = x.clone()
        hit = adv0.clone()  # examples adversarial at x (delta = 0) need no search
        for t in range(self.steps):
            g, _ = self.grad(x_t)
            sign = -1.0 if t < descent else 1.0
            x_t = self.project(x_t + sign * self.alpha * self.step_direction(g))
            adv, _ = self.score(x_t)
            new = adv & ~hit
            if bool(new.any()):
                idx = new.nonzero().squeeze(1)
                delta = self._shrink_search(x[idx], x_t[idx] - x[idx], idx)
                l2 = flat_norm(delta, "l2")
                take = l2 < best_l2[idx]
                rows = idx[take]
                best[rows] = x[rows] + delta[take]
                best_l2[rows] = l2[take]
                found[rows] = True
                hit |= new
        return x_t

    def _whey(self, x0: Tensor, delta: Tensor, idx: Tensor) -> Tensor:
        """Shrink adversarial perturbations ``delta`` (rows ``idx`` of the batch) while adversarial."""
        flat = delta.reshape(delta.shape[0], -1)
        n = flat.shape[1]
        if self.whey_groups > 0 and n > 0:
            # rank of each entry by |delta| -> group id 0 (smallest) .. groups-1 (largest)
            ranks = flat.abs().argsort(dim=1).argsort(dim=1)
            group = (ranks * self.whey_groups) // n
            for gid in range(self.whey_groups):
                trial = torch.where(group == gid, torch.zeros_like(flat), flat)
                adv, _ = self.score(x0 + trial.reshape(delta.shape), idx)
                flat = torch.where(adv[:, None], trial, flat)
        for _ in range(self.whey_rounds):
            halve = torch.rand(flat.shape, generator=self.generator, device=flat.device) < 0.5
            trial = torch.where(halve, flat * 0.5, flat)
            adv, _ = self.score(x0 + trial.reshape(delta.shape), idx)
            flat = torch.where(adv[:, None], trial, flat)
        return self._shrink_search(x0, flat.reshape(delta.shape), idx)

    # ------------------------------------------------------------------ the attack ----------
    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        adv0, _ = self.score(x)  # misclassified clean inputs are adversarial with delta = 0
        found = adv0.clone()
        best = x.clone()
        best_l2 = torch.where(found, 0.0, float("inf")).to(torch.float64)
        fallback = self._trajectory(x, 0, best, best_l2, found, adv0)
        if self.descent_steps > 0:
            self._trajectory(x, self.descent_steps, best, best_l2, found, adv0)
        idx = (found & (best_l2 > 0)).nonzero().squeeze(1)
        if idx.numel():
            best[idx] = x[idx] + self._whey(x[idx], best[idx] - x[idx], idx)
        return torch.where(per_example(found, x), best, fallback)
