"""Spectral density by stochastic Lanczos quadrature (Lin, Saad & Yang, SIAM Review 2016;
applied to network Hessians by Ghorbani, Krishnan & Xiao, ICML 2019).

For a unit Rademacher start ``v = z / sqrt(n)``, ``m`` Lanczos steps give ``T_m = S diag(theta) S^T``
and the Gauss quadrature ``v^T f(A) v ~ sum_j tau_j f(theta_j)`` with ``tau_j = S[0, j]^2``.
Averaging over starts, the spectral measure ``(1/n) sum_i delta(t - lambda_i)`` is approximated by
nodes ``theta`` with weights ``tau / num_starts``; the density is that measure convolved with a
Gaussian of width ``sigma`` and normalised to integrate to 1 on the grid. The first moment of the
quadrature is exactly ``v^T A v``, so the density's mean is a Hutchinson estimate of tr(A)/n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from gradlab.curvature.lanczos import Lanczos
from gradlab.curvature.operator import as_operator
from gradlab.curvature.sampling import make_generator, rademacher
from gradlab.core.errors import check


@dataclass
class DensityResult:
    """``grid`` (G,) eigenvalue axis, ``density`` (G,) >= 0 integrating to 1 (trapezoid rule);
    ``nodes``/``weights`` (num_starts, steps) raw quadrature (weights of each start sum to 1);
    ``sigma`` the Gaussian width used; ``num_matvecs`` products."""

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    num_matvecs: int
    tridiagonals: Optional[list] = None  # per start: (T (k, k), beta_k), beta_k the coupling to step k + 1


    @property
    def mean(self) -> float:
        """Mean eigenvalue of the quadrature measure (an estimate of tr(A)/n)."""
        return float((self.nodes * self.weights).sum() / self.weights.sum())

    def fraction_below(self, threshold: float = 0.0, zero_tol: float = 0.0) -> "SpectralFraction":
        """The fraction of eigenvalues below ``threshold`` (with 0: the Morse index as a fraction
        of the dimension, the share of descent directions of negative curvature).

        Each start's quadrature gives ``v^T 1(A < t) v``, an unbiased estimate of that fraction
        for a random unit ``v`` once Lanczos has resolved the spectrum around ``t``; the estimate
        is their mean and ``std_error`` their standard error over the starts. Nodes within
        ``zero_tol`` of ``threshold`` cannot be told apart from it (the quadrature's resolution
        there, or eigenvalues that are numerically zero): their weight is ``ambiguous``, counted
        half in the estimate, and ``low``/``high`` bound the fraction by counting it wholly out
        or in (each widened by two standard errors)."""
        w = self.weights
        below = (w * (self.nodes < threshold - zero_tol)).sum(1)
        near = (w * ((self.nodes - threshold).abs() <= zero_tol)).sum(1)
        per_start = below + 0.5 * near
        k = per_start.numel()
        est = float(per_start.mean())
        se = float(per_start.std(unbiased=True) / math.sqrt(k)) if k > 1 else math.nan
        amb = float(near.mean())
        spread = 2 * se if math.isfinite(se) else 0.0
        return SpectralFraction(est, se, amb, max(0.0, float(below.mean()) - spread),
                                min(1.0, float((below + near).mean()) + spread), k)

    def fraction_bracketed(self, threshold: float = 0.0, zero_tol: float = 0.0) -> "SpectralFraction":
        """The fraction of eigenvalues below ``threshold`` with a bracket that holds for every
        start, not only once Lanczos has resolved the spectrum there.

        For start ``v`` the quantity is ``F = v^T 1(A < t) v``, the spectral measure of ``v``
        below ``t``. The Gauss-Radau rule with one node prescribed at ``t`` (``T`` extended by
        one row whose diagonal makes ``t`` an eigenvalue; Golub & Meurant, "Matrices, Moments
        and Quadrature", ch. 6) brackets it exactly -- the Chebyshev-Markov-Stieltjes
        inequalities in Krein's form: ``sum_{x_j < t} w_j <= F <= sum_{x_j < t} w_j + w_t``,
        the weight ``w_t`` at ``t`` being the largest mass any measure with the same first
        ``2k`` moments can put there. Per start: ``low = sum_{x_j < t} w_j``, ``high = low +
        w_t`` and the estimate their midpoint; a Krylov space that became invariant (Lanczos
        exhausted) makes the Gauss rule exact and ``w_t`` the weight of nodes at ``t``. Nodes
        within ``zero_tol`` of ``t`` (numerically zero eigenvalues) count as ambiguous too.

        Returns a :class:`SpectralFraction`: ``value`` the mean of the midpoints, ``std_error``
        their standard error over the starts (the sampling error: ``E[F] = (1/n) #{lambda <
        t}`` for a unit Rademacher ``v``), ``ambiguous`` the mean ``w_t`` (the quadrature's
        share of the error: the value is within ``ambiguous / 2`` of the mean of the starts'
        ``F``), ``low``/``high`` the mean bracket widened by two standard errors.
        """
        if self.tridiagonals is None:
            return self.fraction_below(threshold, zero_tol)
        lows, widths = [], []
        for T, beta in self.tridiagonals:
            low, width = radau_bracket(T, beta, threshold, zero_tol)
            lows.append(low)
            widths.append(width)
        low_t = torch.tensor(lows, dtype=torch.float64)
        width_t = torch.tensor(widths, dtype=torch.float64)
        mid = low_t + 0.5 * width_t
        k = mid.numel()
        est = float(mid.mean())
        se = float(mid.std(unbiased=True) / math.sqrt(k)) if k > 1 else math.nan
        spread = 2 * se if math.isfinite(se) else 0.0
        return SpectralFraction(est, se, float(width_t.mean()), max(0.0, float(low_t.mean()) - spread),
                                min(1.0, float((low_t + width_t).mean()) + spread), k)


def radau_bracket(T: Tensor, beta: float, t: float, zero_tol: float = 0.0) -> tuple[float, float]:
    """``(low, width)`` of :meth:`DensityResult.fraction_bracketed` for one start: Lanczos'
    tridiagonal ``T`` (k, k) and its coupling ``beta`` to the next step (0: invariant space)."""
    k = T.shape[0]
    theta, S = torch.linalg.eigh(T)
    scale = max(float(theta.abs().max()), abs(t), 1e-300)
    nearest = float((theta - t).abs().min())
    if beta > 0 and nearest > 1e-12 * scale:
        e = torch.zeros(k, dtype=torch.float64)
        e[-1] = 1.0
        delta = torch.linalg.solve(T - t * torch.eye(k, dtype=torch.float64), e)
        ext = torch.zeros(k + 1, k + 1, dtype=torch.float64)
        ext[:k, :k] = T
        ext[k, k - 1] = ext[k - 1, k] = beta
        ext[k, k] = t + beta * beta * float(delta[-1])
        theta, S = torch.linalg.eigh(ext)
        w = S[0, :] ** 2
        fixed = torch.zeros_like(theta, dtype=torch.bool)
        fixed[int((theta - t).abs().argmin())] = True  # the prescribed node
    else:  # exact Gauss rule (invariant space), or t is a Ritz value already: that node is t
        w = S[0, :] ** 2
        fixed = (theta - t).abs() <= 1e-12 * scale if beta > 0 else torch.zeros_like(theta, dtype=torch.bool)
    near = fixed | ((theta - t).abs() <= zero_tol)
    below = (theta < t) & ~near
    return float(w[below].sum()), float(w[near].sum())


@dataclass
class SpectralFraction:
    """The fraction of a spectrum below a threshold, estimated by stochastic Lanczos quadrature:
    ``value`` with its ``std_error`` over ``starts`` random starts, the ``ambiguous`` weight of
    nodes within the zero tolerance, and bounds ``low <= value <= high``."""

    value: float
    std_error: float
    ambiguous: float
    low: float
    high: float
    starts: int


def slq_density(
    A,
    num_starts: int = 4,
    lanczos_steps: int = 80,
    grid: Optional[Tensor] = None,
    sigma: Optional[float] = None,
    *,
    grid_points: int = 512,
    seed: Optional[int] = 0,
) -> DensityResult:
    """Gaussian-broadened spectral density of the symmetric ``A`` (module docstring).

    Args:
        A: operator or dense square tensor.
        num_starts: independent Rademacher starts (>= 1); more reduces the variance.
        lanczos_steps: steps per start (capped at n); more resolves more of the spectrum.
        grid: evaluation points (G,); default ``grid_points`` points spanning the nodes +- 5 sigma.
        sigma: Gaussian width (> 0); default 1% of the node range (or 1e-3 if all nodes coincide).
    Returns:
        :class:`DensityResult`; products used = ``num_starts * steps``.
    """
    op = as_operator(A)
    check(num_starts >= 1, f"invalid num_starts: {num_starts} (must be >= 1)")
    check(lanczos_steps >= 1, f"invalid lanczos_steps: {lanczos_steps} (must be >= 1)")
    check(sigma is None or sigma > 0, f"invalid sigma: {sigma} (must be > 0)")
    steps = min(lanczos_steps, op.n)
    gen = make_generator(seed)
    start = op.num_matvecs
    nodes, weights, tris = [], [], []
    for _ in range(num_starts):
        v0 = rademacher(op.n, gen, device=op.device)
        # no restart on breakdown: the quadrature must stay the Krylov space of v0
        lz = Lanczos(op, v0.unsqueeze(0), generator=gen, restart_on_breakdown=False, max_steps=steps)
        while lz.steps < steps and not lz.exhausted:
            lz.step()
        T = lz.tridiagonal()[0]
        tris.append((T, 0.0 if lz.exhausted or bool(lz.stopped[0]) else float(lz.last_beta[0])))
        theta, S = torch.linalg.eigh(T)
        pad = steps - theta.numel()  # zero-weight padding keeps a rectangular array
        nodes.append(torch.cat([theta, theta[-1:].expand(pad)]))
        weights.append(torch.cat([S[0, :] ** 2, torch.zeros(pad, dtype=torch.float64)]))
    nodes_t, weights_t = torch.stack(nodes), torch.stack(weights)
    lo, hi = float(nodes_t.min()), float(nodes_t.max())
    if sigma is None:
        sigma = 0.01 * (hi - lo) if hi > lo else 1e-3 * max(1.0, abs(hi))
    if grid is None:
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid_points, dtype=torch.float64)
    grid = grid.to(torch.float64).cpu()
    w = (weights_t / num_starts).reshape(-1)
    x = nodes_t.reshape(-1)
    gauss = torch.exp(-0.5 * ((grid[:, None] - x[None, :]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    density = gauss @ w  # (G,)
    area = float(torch.trapezoid(density, grid))
    if area > 0:
        density = density / area
    return DensityResult(grid, density, nodes_t, weights_t, float(sigma), op.num_matvecs - start, tris)
