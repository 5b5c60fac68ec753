"""Minimum-norm attacks (FAB, CW, DeepFool, FMN): one search, every budget.

A minimum-norm attack looks for each example's *smallest* adversarial perturbation instead of the
strongest one inside a given eps-ball. :class:`MinimumNormAttack` gives every such attack

* :meth:`MinimumNormAttack.minimum_norm` ``(x, y) -> (x_adv, norms)``: the attack's ``search``
  (any eps), then checked on the eval-mode model: ``norms[i] = ||x_adv[i] - x[i]||`` in the
  attack's norm where ``x_adv[i]`` is adversarial, ``0`` (and ``x_adv[i] = x[i]``) where the clean
  input already is, ``inf`` (and ``x_adv[i] = x[i]``) where the search found nothing;
* :meth:`MinimumNormAttack.shrink`: the final refinement CW and DeepFool share, a search on the
  scale ``t`` of a found perturbation (``x + t (x_adv - x)``, ``t`` in [0, 1]) for the smallest
  scale the attack's own success test still accepts (:func:`smallest_scale`: secant steps on the
  attack's margin along the segment, safeguarded by bisection, a few forward passes); it only
  ever returns a point that passed that test, so it never lengthens a perturbation and never
  loses an adversarial;
* ``perturb`` at a budget eps: the found adversarial where its norm is at most eps, else the
  clean input, so that robust accuracy at eps is exactly ``mean(norms > eps)``.

From the norms of one run (:func:`norm_curve`, :func:`norm_summary`) follow robust accuracy at any
eps, the whole robust-accuracy-vs-eps curve (a step function, one step per norm) and the median
norm; :func:`gradlab.attacks.report.robustness_sweep` runs a minimum-norm attack once for a whole
eps sweep and fills the table from the norms.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import pandas as pd
import torch
from torch import Tensor

from gradlab.attacks.base import Attack, flat_norm, per_example
from gradlab.core.autocast import DTYPES
from gradlab.core.options import Option

#: The option of the final refinement (:meth:`MinimumNormAttack.shrink`) CW and DeepFool declare.
REFINE = Option("refine", int, 20, "the most forward passes spent shrinking the found perturbation's scale "
                "to the smallest that still succeeds (secant steps, bisection as fallback; stops within "
                "2^-20 relative; 0: off)", low=0)

#: Relative precision on the scale at which :func:`smallest_scale` stops.
SCALE_TOL = 2.0**-20

#: The refinement keeps a point only where its margin exceeds this many ulps (of the logits' dtype
#: or of ``--precision``'s, the coarser) of its largest logit: rounding noise that differs with the
#: batch a point is evaluated in (up to 3 ulps seen on the digits models and resnet20) must not
#: undo the success.
NOISE_ULPS = 8

#: ``test(logits (b, C), idx (b,)) -> (ok (b,) bool, margin (b,))`` of rows ``idx``: an attack's
#: success test and a margin continuous in the logits, positive on the successful side.
SuccessTest = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

#: Columns of :func:`norm_curve`.
CURVE_COLUMNS = ["eps", "robust_acc"]


class MinimumNormAttack(Attack):
    """Base of the minimum-norm attacks; a subclass writes :meth:`search`."""

    #: What :func:`gradlab.attacks.report.robustness_sweep` looks for to run the attack once.
    minimum_norm_attack = True

    def search(self, x: Tensor, y: Tensor) -> Tensor:
        """Candidate adversarial inputs of small norm (``(B, ...)``, any budget); checked by the caller."""
        raise NotImplementedError

    def shrink(self, x: Tensor, adv: Tensor, found: Tensor, test: SuccessTest, passes: int,
               z_x: Optional[Tensor] = None, z_adv: Optional[Tensor] = None) -> Tensor:
        """``adv`` ``(B, ...)`` with each row ``i`` of ``found`` ``(B,)`` bool moved to
        ``x + t_i (adv_i - x_i)``, ``t_i`` the smallest scale in [0, 1] found that the attack's
        ``test`` accepts, after at most ``passes`` forward passes (:func:`smallest_scale`; 0: off).

        ``test(logits, idx)`` of rows ``idx`` gives ``(ok, margin)``: the attack's success test
        (``(b,)`` bool) and a margin continuous in the logits, positive on the successful side,
        which only steers the search. ``z_x``, ``z_adv`` ``(B, C)``: the logits of ``x`` and ``adv``
        where the caller has them (else one forward pass each). ``x`` fails the test and ``adv``
        passes it by assumption; only points that passed are returned (``adv`` where none did)."""
        idx = found.nonzero()[:, 0]
        if passes == 0 or idx.numel() == 0:
            return adv
        x_i, d = x[idx], adv[idx] - x[idx]
        out = adv.clone()
        low = DTYPES[self.precision]

        def ulp_of(z: Tensor) -> float:
            return max(torch.finfo(z.dtype).eps, torch.finfo(low).eps if low is not None else 0.0)

        def guarded(z: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
            # the margin is asked to clear the logits' rounding noise (which differs with the
            # batch a point is evaluated in), so that a kept point stays adversarial when checked
            ok, margin = test(z, idx[rows])
            margin = margin - NOISE_ULPS * ulp_of(z) * z.abs().amax(dim=1)
            return ok & (margin > 0), margin

        def probe(t: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
            p = (x_i[rows] + per_example(t.to(x.dtype), d[rows]) * d[rows]).clamp(0.0, 1.0)
            with torch.no_grad():
                ok, margin = guarded(self.logits(p), rows)
            out[idx[rows[ok]]] = p[ok]  # the very point that passed
            return ok, margin

        every = torch.arange(idx.numel(), device=idx.device)
        with torch.no_grad():
            ends = [self.logits(v[idx]) if z is None else z[idx] for v, z in ((x, z_x), (adv, z_adv))]
        noise = NOISE_ULPS * ulp_of(ends[1]) * ends[1].abs().amax(dim=1)
        smallest_scale(probe, guarded(ends[0], every)[1], guarded(ends[1], every)[1], passes, settled=noise)
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

    def clean_logits(self, x: Tensor) -> Tensor:
        """Eval-mode logits of ``x``: those :meth:`minimum_norm` computed for its success check when
        ``x`` is the very batch it passed to :meth:`search` (one forward pass fewer), else a new pass."""
        kept = self.__dict__.get("_clean")
        if kept is not None and kept[0] is x:
            return kept[1]
        with torch.no_grad():
            return self.logits(x)

    def _checked_search(self, x0: Tensor, y0: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            z0 = self.logits(x0)
        already = self.is_adversarial(z0)
        self._clean = (x0, z0)
        try:
            with torch.enable_grad():
                adv = self.search(x0, y0).detach().clamp(0.0, 1.0)
        finally:
            self._clean = None
        with torch.no_grad():
            fooled = self.is_adversarial(self.logits(adv)) & ~already
        adv = torch.where(per_example(fooled, x0), adv, x0)
        norms = flat_norm(adv - x0, self.norm)
        norms = torch.where(fooled | already, norms, torch.full_like(norms, math.inf))
        return adv, norms.masked_fill(already, 0.0)


def smallest_scale(probe: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], m0: Tensor, m1: Tensor,
                   passes: int, tol: float = SCALE_TOL, settled: Optional[Tensor] = None) -> Tensor:
    """Per row, the smallest scale ``t`` in (0, 1] found to pass a success test along a segment
    (``t = 0`` fails it, ``t = 1`` passes it), float64 ``(n,)`` (1 where no smaller scale passed).

    ``probe(t, rows)`` evaluates scales ``t`` ``(r,)`` of rows ``rows`` (positions in ``0..n-1``),
    one forward pass, and returns ``(ok, margin)``; ``m0``, ``m1`` ``(n,)`` are the margins at
    ``t = 0`` and ``t = 1``. The margin's root is estimated by the secant through each row's last
    two points, taken only where it lies between the bracket's midpoint and the end of the smaller
    margin (Dekker's safeguard), else the midpoint is tried (bisection); a secant trial aims
    ``tol / 2`` relative past the estimate, so that it lands on the passing side. A row stops once
    its bracket ``[lo, hi]`` is within ``tol * hi``, the estimate is within ``tol * hi`` below
    ``hi``, or the margin at ``hi`` is at most ``settled`` ``(n,)`` (the logits' rounding noise:
    closer points differ by noise only); the whole search after ``passes`` probes or when every row stopped. On a linear margin
    the first estimate is the root: one probe. Only the pass/fail of a probe moves ``hi``, so the
    margin steers the search but never decides success."""
    lo = torch.zeros(m0.numel(), dtype=torch.float64, device=m0.device)
    hi = torch.ones_like(lo)
    glo, ghi = m0.double(), m1.double()  # the margins at the bracket's ends
    ta, ga, tb, gb = lo.clone(), glo.clone(), hi.clone(), ghi.clone()  # each row's last two points
    active = torch.ones_like(lo, dtype=torch.bool)
    for _ in range(passes):
        s = tb - gb * (tb - ta) / (gb - ga)
        mid = (lo + hi) / 2
        near = torch.where(glo.abs() < ghi.abs(), lo, hi)  # the end of the smaller margin
        secant = torch.isfinite(s) & (s > torch.minimum(mid, near)) & (s < torch.maximum(mid, near)) & (s < hi)
        s = torch.where(secant, s, mid)
        active &= (hi - lo > tol * hi) & ~(secant & (hi - s <= tol * hi))
        if settled is not None:
            active &= ghi > settled
        rows = active.nonzero()[:, 0]
        if rows.numel() == 0:
            break
        t = torch.where(secant, s * (1 + tol / 2), mid)[rows]  # inside (lo, hi) for a row not stopped
        ok, g = probe(t, rows)
        g = g.double()
        hi[rows[ok]], ghi[rows[ok]] = t[ok], g[ok]
        lo[rows[~ok]], glo[rows[~ok]] = t[~ok], g[~ok]
        ta[rows], ga[rows] = tb[rows], gb[rows]
        tb[rows], gb[rows] = t, g
    return hi


def class_margin(z: Tensor, cls: Tensor) -> Tensor:
    """``max_{j != c} z_j - z_c`` ``(b,)`` of logits ``z`` ``(b, C)`` and classes ``cls`` ``(b,)``:
    positive where ``c`` is not the top class."""
    own = z.gather(1, cls[:, None])[:, 0]
    return z.scatter(1, cls[:, None], -math.inf).amax(dim=1) - own


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


__all__ = ["CURVE_COLUMNS", "REFINE", "SCALE_TOL", "MinimumNormAttack", "SuccessTest", "class_margin", "norm_curve",
           "norm_summary", "robust_at", "smallest_scale"]
