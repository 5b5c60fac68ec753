"""L-BFGS with an exact line search: the two-loop recursion and a secant search on ``phi'(t)``.

The finite-termination theorem of quasi-Newton methods (Nocedal & Wright 2006, Thm 6.4 for BFGS;
L-BFGS with memory >= n is BFGS from the scaled identity) assumes an *exact* line search: on a
strictly convex quadratic in ``n`` dimensions the iterates are then those of preconditioned
conjugate gradients and reach the minimiser in at most ``n`` iterations. torch's strong-Wolfe
search (``c2 = 0.9``) stops long before the minimum along the line, so
:class:`gradlab.optim.lbfgs.LBFGS` with ``exact_line_search`` runs this module instead:

* direction ``d = -H g`` by the two-loop recursion (N&W Algorithm 7.4), ``H_0 = (s^T y / y^T y) I``
  of the newest pair (the identity before any), pairs kept when ``s^T y > 1e-10`` (torch's rule),
  at most ``history_size``;
* step: ``t`` with ``phi'(t) = g(x + t d)^T d = 0`` to ``|phi'(t)| <= exact_tol |phi'(0)|``, by
  secant steps on ``phi'`` from ``(0, phi'(0))`` and a first trial ``t_1`` (``lr``; on the first
  iteration ``min(1, 1 / |g|_1) lr``, as torch). While ``phi'`` stays negative the secant
  extrapolates (at most 10x, at least 2x the last step); once the root is bracketed it is the
  regula falsi with the Illinois modification, bisection when a secant point leaves the bracket.
  ``phi'`` is linear on a quadratic, so the first secant step is the exact minimiser: two
  evaluations per iteration. At most :data:`MAX_EVALS` evaluations per search (then the best
  bracketed point).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

MAX_EVALS = 25
CURVATURE_EPS = 1e-10  # keep a pair only when s^T y exceeds this (torch.optim.LBFGS)


def two_loop(g: Tensor, S: list[Tensor], Y: list[Tensor]) -> Tensor:
    """``-H g`` for the L-BFGS inverse Hessian of the pairs (oldest first); ``-g`` without any."""
    q = g.clone()
    rhos = [1.0 / float(y.dot(s)) for s, y in zip(S, Y)]
    alphas = []
    for s, y, rho in zip(reversed(S), reversed(Y), reversed(rhos)):
        a = rho * float(s.dot(q))
        q.add_(y, alpha=-a)
        alphas.append(a)
    if S:
        q.mul_(float(S[-1].dot(Y[-1])) / float(Y[-1].dot(Y[-1])))
    for s, y, rho, a in zip(S, Y, rhos, reversed(alphas)):
        b = rho * float(y.dot(q))
        q.add_(s, alpha=a - b)
    return q.neg_()


def exact_search(dphi: Callable[[float], float], dphi0: float, t1: float, tol: float) -> tuple[float, int]:
    """``(t, evaluations)``: a root of ``phi'`` on ``t > 0`` (module docstring); ``dphi0 < 0``."""
    lo, d_lo = 0.0, dphi0  # phi' < 0 at lo
    hi = d_hi = None  # phi' > 0 at hi, once found
    t_prev, d_prev = 0.0, dphi0
    t, side = t1, 0
    best = (0.0, abs(dphi0))
    for k in range(1, MAX_EVALS + 1):
        d = dphi(t)
        if d != d:  # NaN: step back towards lo
            hi, d_hi = t, float("inf")
            t = 0.5 * (lo + t)
            continue
        if abs(d) < best[1]:
            best = (t, abs(d))
        if abs(d) <= tol * abs(dphi0):
            return t, k
        if d < 0:
            lo, d_lo = t, d
            if side == -1 and hi is not None:
                d_hi *= 0.5  # Illinois: the same end twice
            side = -1
        else:
            hi, d_hi = t, d
            if side == 1:
                d_lo *= 0.5
            side = 1
        if hi is None:  # still descending: extrapolate by a secant, between 2x and 10x the step
            slope = (d - d_prev) / (t - t_prev)
            guess = t - d / slope if slope > 0 else 10 * t
            new = min(max(guess, 2 * t), 10 * t)
        elif d_hi == float("inf"):
            new = 0.5 * (lo + hi)
        else:
            new = lo - d_lo * (hi - lo) / (d_hi - d_lo)
            if not lo < new < hi:
                new = 0.5 * (lo + hi)
        t_prev, d_prev, t = t, d, new
    return best[0], MAX_EVALS
