"""The trust-region subproblem for a model Hessian known by its eigen-decomposition.

``min_p  g^T p + p^T B p / 2  subject to ||p|| <= radius``, where ``B = gamma I + P diag(lam) P^T``
with ``P`` (n, k) orthonormal: the shape of a limited-memory quasi-Newton matrix in compact form
(Brust, Erway & Marcia 2017, "On solving L-SR1 trust-region subproblems"). In the eigenbasis the
problem is separable: with ``a = P^T g`` and ``g_perp = g - P a`` (on which ``B = gamma``), the
solution is ``p(sigma) = -P a / (lam + gamma + sigma) - g_perp / (gamma + sigma)`` for the
smallest ``sigma >= max(0, -lambda_min)`` with ``||p(sigma)|| <= radius``, equality when
``sigma > 0`` (Moré & Sorensen 1983; Nocedal & Wright 2006, Thm 4.1). ``sigma`` solves the secular
equation ``1/||p(sigma)|| = 1/radius`` by safeguarded Newton steps (bisection when Newton leaves
the bracket). The "hard case" (``g`` orthogonal to the lowest eigenvector while ``lambda_min < 0``)
adds ``tau u_min`` to reach the boundary.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _ratio(a: Tensor, d: Tensor) -> Tensor:
    """``a / d`` with 0 where ``a`` is 0 (a coordinate that is absent adds nothing, even at d = 0)."""
    return torch.where(a == 0, torch.zeros_like(a), a / torch.where(a == 0, torch.ones_like(d), d))


def _norm(a: Tensor, lam: Tensor, sigma: float) -> float:
    return float(_ratio(a, lam + sigma).norm())


def solve_sigma(a: Tensor, lam: Tensor, radius: float, low: float) -> float:
    """The ``sigma > low`` with ``||a / (lam + sigma)|| = radius`` (``||a / (lam + low)|| > radius``)."""
    hi = low + float(a.norm()) / radius + 1.0
    while _norm(a, lam, hi) > radius:
        hi = low + 2 * (hi - low)
    lo, sigma = low, hi
    for _ in range(200):
        q = _ratio(a, lam + sigma)
        nq = float(q.norm())
        if abs(nq - radius) <= 1e-12 * radius or hi - lo <= 1e-15 * max(1.0, hi):
            break
        if nq > radius:
            lo = sigma
        else:
            hi = sigma
        # Newton on phi(sigma) = 1/||q|| - 1/radius (nearly linear in sigma: Moré & Sorensen)
        dq = float(_ratio(q * q, lam + sigma).sum())  # -d||q||^2/dsigma / 2
        step = (nq - radius) / radius * nq * nq / dq if dq > 0 else math.inf
        new = sigma + step
        sigma = new if lo < new < hi else 0.5 * (lo + hi)
    return sigma


def eigen_trust_step(g: Tensor, gamma: float, P: Tensor, lam: Tensor, radius: float) -> tuple[Tensor, bool]:
    """The exact minimiser ``p`` of the model over the ball, and whether it lies on the boundary.

    ``g`` (n,), ``P`` (n, k) orthonormal columns (k may be 0), ``lam`` (k,) the eigenvalues of
    ``B - gamma I`` on them; ``gamma > 0`` is ``B``'s eigenvalue on the complement of ``P``.
    """
    a = P.T @ g
    g_perp = g - P @ a
    coords = torch.cat([a, g_perp.norm().reshape(1)])
    eig = torch.cat([lam + gamma, torch.tensor([gamma], dtype=g.dtype, device=g.device)])
    lam_min = float(eig.min())

    def point(sigma: float) -> Tensor:
        return -(P @ _ratio(a, lam + gamma + sigma)) - g_perp / (gamma + sigma)

    if lam_min > 0 and _norm(coords, eig, 0.0) <= radius:
        return point(0.0), False  # the model's own minimiser lies inside
    low = max(0.0, -lam_min)
    if lam_min < 0:
        # the hard case: g has (almost) no component on the lowest eigenvector(s); since gamma > 0
        # those lie in P. If p(-lambda_min) without them is inside the ball, go to the boundary
        # along the lowest eigenvector.
        d = lam + gamma
        on_min = (d - lam_min).abs() <= 1e-12 * float(eig.abs().max())
        if float(a[on_min].abs().max()) <= 1e-10 * float(coords.norm()):
            keep = ~on_min
            p = -(P[:, keep] @ (a[keep] / (d[keep] - lam_min))) - g_perp / (gamma - lam_min)
            inner = float(p.norm())
            if inner <= radius:
                u = P[:, int(torch.nonzero(on_min).flatten()[0])]
                return p + math.sqrt(max(radius ** 2 - inner ** 2, 0.0)) * u, True
    sigma = solve_sigma(coords, eig, radius, low)
    return point(sigma), True
