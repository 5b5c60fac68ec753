"""Minimum-norm attacks (FAB, CW, DeepFool, FMN): one search, every budget.

A minimum-norm attack looks for each example's *smallest* adversarial perturbation instead of the
strongest one inside a given eps-ball. :class:`MinimumNormAttack` gives every such attack

* :meth:`MinimumNormAttack.minimum_norm` ``(x, y) -> (x_adv, norms)``: the attack's ``search``
  (any eps), then checked on the eval-mode model: ``norms[i] = ||x_adv[i] - x[i]||`` in the
  attack's norm where ``x_adv[i]`` is adversarial, ``0`` (and ``x_adv[i] = x[i]``) where the clean
  input already is, ``inf`` (and ``x_adv[i] = x[i]``) where the search found nothing;
* :meth:`MinimumNormAttack.shrink`: the final refinement CW and DeepFool share, a bisection on
  the scale ``t`` of a found perturbation (``x + t (x_adv - x)``, ``t`` in [0, 1]) for the smallest
  scale the attack's own success test still accepts; it only ever returns a point that passed
  that test, so it never lengthens a perturbation and never loses an adversarial;
* ``perturb`` at a budget eps: the found adversarial where its norm is at most eps, else the
  clean input, so that robust accuracy at eps is exactly ``mean(norms > eps)``.

From the norms of one run (:func:`norm_curve`, :func:`norm_summary`) follow robust accuracy at any
eps, the whole robust-accuracy-vs-eps curve (a step function, one step per norm) and the median
norm; :func:`gradlab.attacks.report.robustness_sweep` runs a minimum-norm attack once for a whole
eps sweep and fills the table from the norms.
"""

from __future__ import annotations

import math
from typing import Callable

import pandas as pd
import torch
from torch import Tensor

from gradlab.attacks.base import Attack, flat_norm, per_example
from gradlab.core.options import Option

#: The option of the final refinement (:meth:`MinimumNormAttack.shrink`) CW and DeepFool declare.
REFINE = Option("refine", int, 20, "bisections on the scale of the found perturbation, for the smallest "
                "one that still succeeds (0: off)", low=0)

#: Columns of :func:`norm_curve`.
CURVE_COLUMNS = ["eps", "robust_acc"]


class MinimumNormAttack(Attack):
    """Base of the minimum-norm attacks; a subclass writes :meth:`search`."""

    #: What :func:`gradlab.attacks.report.robustness_sweep` looks for to run the attack once.
    minimum_norm_attack = True

    def search(self, x: Tensor, y: Tensor) -> Tensor:
        """Candidate adversarial inputs of small norm (``(B, ...)``, any budget); checked by the caller."""
        raise NotImplementedError

    def shrink(self, x: Tensor, adv: Tensor, found: Tensor, ok: Callable[[Tensor, Tensor], Tensor],
               steps: int) -> Tensor:
        """``adv`` ``(B, ...)`` with each row ``i`` of ``found`` ``(B,)`` bool moved to
        ``x + t_i (adv_i - x_i)``, ``t_i`` the smallest scale accepted by ``ok(logits, idx)``
        (``(b,)`` bool for rows ``idx``) after ``steps`` bisections of [0, 1] (one forward pass
        each, on the eval-mode model); ``t = 1`` (``adv`` itself) is accepted by assumption.
        ``x`` and ``adv`` lie in [0, 1], so every point of the segment does too."""
        idx = found.nonzero()[:, 0]
        if steps == 0 or idx.numel() == 0:
            return adv
        lo = torch.zeros(idx.numel(), device=x.device, dtype=x.dtype)
        hi = torch.ones_like(lo)
        d = adv[idx] - x[idx]
        with torch.no_grad():
            for _ in range(steps):
                mid = (lo + hi) / 2
                good = ok(self.logits(x[idx] + per_example(mid, d) * d), idx)
                hi, lo = torch.where(good, mid, hi), torch.where(good, lo, mid)
        out = adv.clone()  # where no smaller scale passed, adv itself (x + 1 * d may round off it)
        out[idx] = torch.where(per_example(hi < 1, d), x[idx] + per_example(hi, d) * d, adv[idx]).clamp(0.0, 1.0)
        return out

    def minimum_norm(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_adv, norms)`` for clean ``x`` ``(B, ...)`` and labels ``y`` ``(B,)``; see the module docstring.

        ``norms`` is float64 ``(B,)`` on ``x``'s device; ``x_adv`` lies in [0, 1].
        """
        with self.session(x, y) as (x0, y0):
            adv, norms = self._checked_search(x0, y0)
        return adv.to(x.device), norms.to(x.device)

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        adv, norms = self._checked_search(x, y)
        return torch.where(per_example(norms <= self.eps * (1 + 1e-6), x), adv, x)

    def _checked_search(self, x0: Tensor, y0: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            already = self.is_adversarial(self.logits(x0))
        with torch.enable_grad():
            adv = self.search(x0, y0).detach().clamp(0.0, 1.0)
        with torch.no_grad():
            fooled = self.is_adversarial(self.logits(adv)) & ~already
        adv = torch.where(per_example(fooled, x0), adv, x0)
        norms = flat_norm(adv - x0, self.norm)
        norms = torch.where(fooled | already, norms, torch.full_like(norms, math.inf))
        return adv, norms.masked_fill(already, 0.0)


def robust_at(norms: Tensor, eps: float) -> float:
    """Robust accuracy at ``eps`` implied by minimum norms ``(N,)`` (0 for examples already wrong)."""
    return (norms > eps).double().mean().item()


def norm_curve(norms: Tensor) -> pd.DataFrame:
    """The robust-accuracy-vs-eps step function of minimum norms ``(N,)``: one row per distinct
    finite norm ``e`` (and ``e = 0``), ``robust_acc = mean(norms > e)``; right-continuous, so the
    accuracy at an eps between two rows is the lower row's."""
    n = norms.double().cpu()
    finite = n[torch.isfinite(n)]
    steps = torch.unique(torch.cat([torch.zeros(1, dtype=torch.float64), finite]))
    acc = (n[None, :] > steps[:, None]).double().mean(dim=1)
    return pd.DataFrame({"eps": steps.numpy(), "robust_acc": acc.numpy()}, columns=CURVE_COLUMNS)


def norm_summary(norms: Tensor, correct: Tensor) -> dict:
    """Figures of one run's minimum norms ``(N,)`` over the examples classified correctly when
    clean (``correct``, ``(N,)`` bool): how many were attacked and broken, and the quartiles of
    their norms (``inf`` where too few were broken). ``median_norm`` is the figure papers quote."""
    att = norms.double().cpu()[correct.cpu()]
    found = torch.isfinite(att)
    out = {"n_attacked": int(att.numel()), "n_found": int(found.sum())}
    for name, q in (("q25_norm", 0.25), ("median_norm", 0.5), ("q75_norm", 0.75)):
        # lower quantile of the sorted norms, inf counted: the median is inf once half survive
        out[name] = att.sort().values[int(math.ceil(q * att.numel())) - 1].item() if att.numel() else math.nan
    return out


__all__ = ["CURVE_COLUMNS", "REFINE", "MinimumNormAttack", "norm_curve", "norm_summary", "robust_at"]
