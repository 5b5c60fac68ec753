"""Stochastic trace estimators, each with a standard error and its product count.

* :func:`hutchinson_trace`: mean of ``z^T A z`` over Rademacher ``z`` (Hutchinson 1989); a fixed
  number of products or an adaptive stop on the relative standard error.
* :func:`hutchpp_trace`: Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021): exact trace on a
  sketched top subspace plus Hutchinson on the rest; error ~ 1/m instead of 1/sqrt(m).
* :func:`xtrace`: XTrace (Epperly, Tropp & Webber, SIMAX 2024): the exchangeable version of
  Hutch++, each test vector used both for the sketch and for the residual estimate.
* :func:`krylov_trace`: Hutch++'s split with the random sketch replaced by a Lanczos Krylov
  subspace (the idea behind Chen & Hallman's Krylov-aware estimators, SIMAX 2023): ``k`` Lanczos
  steps give ``Q`` and ``tr(Q^T A Q) = sum(alpha)`` with no extra products, so more of the budget
  goes to the Hutchinson estimate of the deflated rest. Measured on digits Hessians: the best
  of the four on a tanh MLP at 40 products (0.7% vs XTrace 1.2%, Hutchinson 2.9%), the worst on
  a small CNN at 60 (1.8% vs XTrace 1.1%): it pays only when a few eigenvalues dominate.

All arithmetic on the estimates is float64; products go through the operator (see
:mod:`gradlab.curvature.operator`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from gradlab.curvature.lanczos import Lanczos
from gradlab.curvature.operator import as_operator
from gradlab.curvature.sampling import gaussian, make_generator, rademacher
from gradlab.core.errors import check


@dataclass
class TraceResult:
    """``estimate`` of tr(A), its standard error ``stderr``, products used, and the method name."""

    estimate: float
    stderr: float
    num_matvecs: int
    method: str


def _mean_stderr(samples: Tensor) -> tuple[float, float]:
    m = samples.numel()
    mean = float(samples.mean())
    return mean, (float(samples.std(unbiased=True)) / math.sqrt(m) if m > 1 else float("inf"))


def hutchinson_trace(
    A,
    num_matvecs: Optional[int] = None,
    *,
    rel_tol: Optional[float] = None,
    max_matvecs: int = 1000,
    min_matvecs: int = 10,
    block: int = 10,
    seed: Optional[int] = 0,
) -> TraceResult:
    """Hutchinson's estimate of tr(A) with Rademacher vectors.

    Args:
        A: operator or dense square tensor.
        num_matvecs: fixed number of products (default 100 unless ``rel_tol`` is given).
        rel_tol: adaptive stop once ``stderr <= rel_tol * |estimate|`` (after ``min_matvecs``,
            at most ``max_matvecs``). Uses |estimate|, so a negative trace stops correctly.
        block: products per ``matmat`` call in adaptive mode.
        seed: seeds the probe vectors.
    Returns:
        :class:`TraceResult`; stderr = sample std / sqrt(m).
    """
    op = as_operator(A)
    check(num_matvecs is None or num_matvecs >= 2, f"invalid num_matvecs: {num_matvecs} (must be >= 2)")
    check(rel_tol is None or rel_tol > 0, f"invalid rel_tol: {rel_tol} (must be > 0)")
    gen = make_generator(seed)
    if rel_tol is None:
        m = 100 if num_matvecs is None else int(num_matvecs)
        Z = rademacher((op.n, m), gen, device=op.device)
        samples = (Z * op.matmat(Z)).sum(0)
        est, se = _mean_stderr(samples)
        return TraceResult(est, se, m, "hutchinson")
    cap = max_matvecs if num_matvecs is None else int(num_matvecs)
    samples = torch.empty(0, dtype=torch.float64)
    while samples.numel() < cap:
        b = min(block, cap - samples.numel())
        Z = rademacher((op.n, b), gen, device=op.device)
        samples = torch.cat([samples, (Z * op.matmat(Z)).sum(0).cpu()])
        est, se = _mean_stderr(samples)
        if samples.numel() >= min_matvecs and se <= rel_tol * abs(est):
            break
    est, se = _mean_stderr(samples)
    return TraceResult(est, se, samples.numel(), "hutchinson")


def hutchpp_trace(A, num_matvecs: int = 99, *, seed: Optional[int] = 0) -> TraceResult:
    """Hutch++ (Meyer et al. 2021, Algorithm 1) with ``num_matvecs`` products split in thirds.

    ``S`` (n, m/3) Rademacher; ``Q = orth(A S)``; ``tr(A) ~ tr(Q^T A Q) + hutchinson((I-QQ^T) A (I-QQ^T))``
    with ``m/3`` more Rademacher vectors. stderr: that of the Hutchinson part (the first part is
    exact given ``Q``), which is the estimator's only randomness once ``Q`` is fixed.
    """
    op = as_operator(A)
    check(num_matvecs >= 6, f"invalid num_matvecs: {num_matvecs} (Hutch++ needs >= 6)")
    gen = make_generator(seed)
    s = num_matvecs // 3
    g = num_matvecs - 2 * s
    S = rademacher((op.n, s), gen, device=op.device)
    Q, _ = torch.linalg.qr(op.matmat(S))  # (n, s)
    t_top = float(torch.trace(Q.T @ op.matmat(Q)))
    G = rademacher((op.n, g), gen, device=op.device)
    Gp = G - Q @ (Q.T @ G)  # project out the sketched subspace
    samples = (Gp * op.matmat(Gp)).sum(0)
    est, se = _mean_stderr(samples)
    return TraceResult(t_top + est, se, 2 * s + g, "hutch++")


def xtrace(A, num_matvecs: int = 100, *, seed: Optional[int] = 0) -> TraceResult:
    """XTrace (Epperly, Tropp & Webber 2024) with ``s = num_matvecs // 2`` test vectors.

    For each ``i``, ``Q_i`` is an orthonormal basis of ``A Omega`` without column ``i`` and
    ``t_i = tr(Q_i^T A Q_i) + w_i^T (I - P_i) A (I - P_i) w_i`` is unbiased (``w_i`` is
    independent of ``Q_i``). The estimate is the mean of the ``t_i``; stderr the paper's
    ``std(t_i) / sqrt(s)``. Every term is computed in the s-dimensional coordinates of
    ``Q = orth(A Omega)`` from ``Y = A Omega`` and ``Z = A Q``: 2s products in all.
    Rademacher test vectors (the paper's optional column normalisation is not applied).
    """
    op = as_operator(A)
    check(num_matvecs >= 4, f"invalid num_matvecs: {num_matvecs} (XTrace needs >= 4)")
    gen = make_generator(seed)
    s = num_matvecs // 2
    Om = rademacher((op.n, s), gen, device=op.device)  # (n, s)
    Y = op.matmat(Om)
    Q, R = torch.linalg.qr(Y)  # (n, s), (s, s)
    Z = op.matmat(Q)
    G = Q.T @ Z  # Q^T A Q, (s, s)
    G = (G + G.T) / 2
    C = Q.T @ Om  # coordinates of the test vectors in Q, (s, s)
    ZtOm = Z.T @ Om  # (s, s)
    wY = (Om * Y).sum(0)  # w_i^T A w_i, (s,)
    ts = torch.empty(s, dtype=torch.float64)
    for i in range(s):
        U, _ = torch.linalg.qr(torch.cat([R[:, :i], R[:, i + 1 :]], dim=1))  # (s, s-1): range(Y_-i) in Q coords
        d = U @ (U.T @ C[:, i])  # P_i w_i = Q d
        top = torch.trace(U.T @ G @ U)
        resid = wY[i] - ZtOm[:, i] @ d - d @ R[:, i] + d @ G @ d
        ts[i] = top + resid
    est, se = _mean_stderr(ts)
    return TraceResult(est, se, 2 * s, "xtrace")


def krylov_trace(A, num_matvecs: int = 60, *, krylov_fraction: float = 0.5, seed: Optional[int] = 0) -> TraceResult:
    """Lanczos-deflated Hutchinson: ``tr(A) ~ tr(Q^T A Q) + hutchinson((I-QQ^T) A (I-QQ^T))``.

    ``k = round(krylov_fraction * num_matvecs)`` Lanczos steps (full reorthogonalisation) from a
    Gaussian start give an orthonormal ``Q`` (n, k) spanning the Krylov space, in which the top
    (and bottom) eigenvectors converge fastest; ``Q^T A Q = T_k`` so its trace is the sum of the
    Lanczos ``alpha``s. The remaining ``num_matvecs - k`` Rademacher vectors, projected off ``Q``,
    estimate the rest. Unbiased because ``Q`` is independent of the Rademacher vectors; stderr is
    that of the Hutchinson part given ``Q`` (as for :func:`hutchpp_trace`).
    """
    op = as_operator(A)
    check(num_matvecs >= 4, f"invalid num_matvecs: {num_matvecs} (must be >= 4)")
    check(0 < krylov_fraction < 1, f"invalid krylov_fraction: {krylov_fraction} (must be in (0, 1))")
    gen = make_generator(seed)
    k = min(op.n, max(1, round(krylov_fraction * num_matvecs)))
    k = min(k, num_matvecs - 2)  # keep at least two samples for a standard error
    lz = Lanczos(op, gaussian((1, op.n), gen), generator=gen, max_steps=k)
    while lz.steps < k and not lz.exhausted:
        lz.step()
    Q = lz.basis()[0].T  # (n, k)
    top = float(lz.alpha.sum())
    G = rademacher((op.n, num_matvecs - lz.steps), gen, device=op.device)
    Gp = G - Q @ (Q.T @ G)
    samples = (Gp * op.matmat(Gp)).sum(0)
    est, se = _mean_stderr(samples)
    return TraceResult(top + est, se, lz.steps + G.shape[1], "krylov")


#: The estimators that need only products with the operator (see gauss_newton.TRACE_METHODS for all).
OPERATOR_TRACE_METHODS = {"xtrace": xtrace, "krylov": krylov_trace, "hutch++": hutchpp_trace, "hutchinson": hutchinson_trace}
