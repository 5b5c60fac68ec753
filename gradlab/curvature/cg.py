"""Conjugate gradient for ``A x = b`` with ``A`` symmetric positive definite, known by products.

The Hessian-free optimizer's inner solver (Martens 2010, "Deep learning via Hessian-free
optimization", Sec. 4.4): CG minimises the quadratic ``phi(x) = x^T A x / 2 - b^T x`` and, besides
an iteration cap and a residual tolerance, stops on *relative progress*: at iteration ``i`` with
``k = max(10, 0.1 i)``, when ``i > k``, ``phi(x_i) < 0`` and

    (phi(x_i) - phi(x_{i-k})) / phi(x_i) < k * eps        (eps = 5e-4 in the paper)

i.e. the last ``k`` iterations lowered ``phi`` by less than ``k eps`` of its value. ``phi`` is
read off the residual ``r = b - A x`` as ``-x^T (b + r) / 2``, with no extra product. A start
``x0`` (the previous step's solution, decayed: the paper's warm start) costs one product.

Exact arithmetic solves an ``n``-dimensional system in at most ``n`` iterations (tested against a
dense solve in float64).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

PROGRESS_EPS = 5e-4  # Martens 2010


@dataclass
class CGResult:
    x: Tensor  # the solution estimate
    residual: Tensor  # b - A x
    iterations: int  # products taken by the iterations (the warm start's one not counted)
    reason: str  # "residual", "progress", "max_iters", "curvature" (p^T A p <= 0 or NaN)


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, x0: Optional[Tensor] = None, *,
                       max_iters: int = 250, rtol: float = 0.0, progress_eps: float = PROGRESS_EPS) -> CGResult:
    """Solve ``A x = b`` for flat ``b`` (module docstring); ``rtol`` stops at ``|r| <= rtol |b|``
    (0: only exact zero), ``progress_eps`` the relative-progress rule (0 disables it)."""
    if x0 is None or not bool(x0.any()):
        x, r = torch.zeros_like(b), b.clone()
    else:
        x = x0.clone()
        r = b - matvec(x)
    p = r.clone()
    rr = r.dot(r)
    stop = (rtol * b.norm()) ** 2
    phis = [float(-0.5 * x.dot(b + r))]
    i, reason = 0, "max_iters"
    if rr <= stop:
        return CGResult(x, r, 0, "residual")
    while i < max_iters:
        i += 1
        Ap = matvec(p)
        pAp = p.dot(Ap)
        if not pAp > 0:  # non-positive curvature, or NaN
            reason = "curvature"
            break
        alpha = rr / pAp
        x.add_(p, alpha=alpha)
        r.sub_(Ap, alpha=alpha)
        rr_new = r.dot(r)
        phis.append(float(-0.5 * x.dot(b + r)))
        if rr_new <= stop:
            reason = "residual"
            break
        k = max(10, int(0.1 * i))
        if progress_eps > 0 and i > k and phis[i] < 0 and (phis[i] - phis[i - k]) / phis[i] < k * progress_eps:
            reason = "progress"
            break
        p.mul_(rr_new / rr).add_(r)
        rr = rr_new
    return CGResult(x, r, i, reason)
