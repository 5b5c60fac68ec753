"""What kind of point is this? The second-order test from the gradient norm and Hessian eigenvalues.

Rules (thresholds are arguments; the defaults are stated here):

1. **not a critical point** when ``||g|| > grad_tol`` (default ``1e-3``, absolute, in loss units
   per parameter unit). The curvature there is still described (``curvature`` field).
2. Otherwise the computed eigenvalues are split by ``zero_tol = max(eig_rtol * max|lambda|,
   eig_atol)`` (defaults ``eig_rtol = 1e-3``, ``eig_atol = 1e-8``): ``> zero_tol`` positive,
   ``< -zero_tol`` negative, else zero (flat).

   * **minimum**: the smallest eigenvalue is positive (Hessian positive definite);
   * **maximum**: the largest eigenvalue is negative;
   * **saddle**: some positive and some negative; reported with the number of negative eigenvalues
     found among those computed and ``neg_pos_ratio = |lambda_min| / lambda_max`` (the magnitude
     ratio used by Ghorbani et al. 2019 and Sagun et al. 2017 to say how far from convex it is);
   * **degenerate**: no negative (or no positive) eigenvalue but some zero ones, or all zero:
     the second-order test is inconclusive (flat directions; e.g. ``x^4`` at 0, or a network
     minimum with its usual flat directions).

Only the extremes of the spectrum matter for rules 2: ``lambda_max`` and ``lambda_min`` decide;
the counts are over the eigenvalues actually computed (top-k and bottom-k), so the number of
negative eigenvalues is a lower bound. Without ``lambda_min`` (no bottom eigenvalue computed) a
point with positive top eigenvalues is reported as ``unknown``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

KINDS = ("minimum", "maximum", "saddle", "degenerate", "not-critical", "unknown")
GRAD_TOL = 1e-3
EIG_RTOL = 1e-3
EIG_ATOL = 1e-8


@dataclass
class CriticalPoint:
    """``kind`` (one of :data:`KINDS`), ``curvature`` (the eigenvalue-only verdict, the same as
    ``kind`` at a critical point), counts among the computed eigenvalues, ``neg_pos_ratio``
    (|lambda_min| / lambda_max, None unless both signs occur), ``zero_tol`` and a one-line ``reason``."""

    kind: str
    curvature: str
    num_negative: int
    num_positive: int
    num_zero: int
    neg_pos_ratio: Optional[float]
    grad_norm: float
    zero_tol: float
    reason: str

    def line(self) -> str:
        return f"{self.kind}: {self.reason}"


def _curvature_kind(lam_max: float, lam_min: Optional[float], zero_tol: float) -> str:
    if lam_min is None:
        return "maximum" if lam_max < -zero_tol else "unknown"
    if lam_min > zero_tol:
        return "minimum"
    if lam_max < -zero_tol:
        return "maximum"
    if lam_min < -zero_tol and lam_max > zero_tol:
        return "saddle"
    return "degenerate"


def classify_point(
    grad_norm: float,
    top: Sequence[float],
    bottom: Sequence[float] = (),
    *,
    grad_tol: float = GRAD_TOL,
    eig_rtol: float = EIG_RTOL,
    eig_atol: float = EIG_ATOL,
) -> CriticalPoint:
    """Classify from the gradient norm and computed eigenvalues (module docstring for the rules).

    Args:
        grad_norm: ``||grad L||`` at the point.
        top: the largest eigenvalues (any order, at least one).
        bottom: the smallest eigenvalues (any order; empty if not computed).
    """
    if not top:
        raise ValueError("classify_point needs at least lambda_max")
    vals = sorted(set(float(v) for v in list(top) + list(bottom)))
    lam_max = max(vals)
    lam_min = min(float(v) for v in bottom) if bottom else None
    zero_tol = max(eig_rtol * max(abs(v) for v in vals), eig_atol)
    neg = sum(v < -zero_tol for v in vals)
    pos = sum(v > zero_tol for v in vals)
    zero = len(vals) - neg - pos
    ratio = abs(lam_min) / lam_max if (lam_min is not None and lam_min < -zero_tol and lam_max > zero_tol) else None
    curvature = _curvature_kind(lam_max, lam_min, zero_tol)
    spectrum = f"lambda_max={lam_max:.4g}" + (f", lambda_min={lam_min:.4g}" if lam_min is not None else "")
    if grad_norm > grad_tol:
        return CriticalPoint("not-critical", curvature, neg, pos, zero, ratio, grad_norm, zero_tol,
                             f"gradient norm {grad_norm:.3g} > grad_tol {grad_tol:g}; curvature there: {curvature} ({spectrum})")
    reasons = {
        "minimum": f"all computed eigenvalues > {zero_tol:.2g} ({spectrum})",
        "maximum": f"all computed eigenvalues < -{zero_tol:.2g} ({spectrum})",
        "saddle": f"{neg} negative eigenvalue(s) found, |lambda_min|/lambda_max = {ratio if ratio is None else round(ratio, 4)} ({spectrum})",
        "degenerate": f"flat directions (|lambda| <= {zero_tol:.2g}): second-order test inconclusive ({spectrum})",
        "unknown": f"lambda_min not computed (ask for bottom eigenvalues) ({spectrum})",
    }
    return CriticalPoint(curvature, curvature, neg, pos, zero, ratio, grad_norm, zero_tol, reasons[curvature])


def classify_function(fn: Callable[[Tensor], Tensor], point: Tensor, **tols) -> CriticalPoint:
    """Classify ``point`` (d,) of a scalar function ``fn`` using its exact gradient and Hessian
    (``torch.autograd.functional``, float64); for low-dimensional functions and teaching."""
    x = point.detach().to(torch.float64)
    g = torch.autograd.functional.jacobian(fn, x)
    H = torch.autograd.functional.hessian(fn, x)
    ev = torch.linalg.eigvalsh((H + H.T) / 2)
    return classify_point(float(torch.linalg.vector_norm(g)), ev.tolist(), ev.tolist(), **tols)
