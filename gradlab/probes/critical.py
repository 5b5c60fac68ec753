"""What kind of point is this? The second-order test from the gradient norm and Hessian eigenvalues.

The one classifier of gradlab: ``probe hessian`` (Lanczos or dense), :func:`classify_function`
and the optimizer trajectories of :mod:`gradlab.landscape.trajectories` all call
:func:`classify_point`.

Rules:

1. **not a critical point** (``not-critical``) when ``||g|| > grad_tol`` (default ``1e-3``,
   absolute, in loss units per parameter unit). The curvature there is still described
   (``curvature`` field).
2. Otherwise every computed eigenvalue ``theta`` comes with an error bound ``e`` (the true
   eigenvalue it stands for lies in ``[theta - e, theta + e]``): it is positive when
   ``theta > e``, negative when ``theta < -e``, and zero (sign not certain) otherwise. So a
   strict minimum with a condition number of 1e3 or 1e6 is a minimum as long as its smallest
   eigenvalue is resolved, whatever its ratio to the largest one (Rosenbrock's minimum:
   0.3994 and 1001.6 in float64, bounds ~1e-12).

   * **minimum**: the smallest eigenvalue is positive (Hessian positive definite);
   * **maximum**: the largest eigenvalue is negative;
   * **saddle**: some positive and some negative; reported with the number of negative eigenvalues
     found among those computed and ``neg_pos_ratio = |lambda_min| / lambda_max`` (the magnitude
     ratio used by Ghorbani et al. 2019 and Sagun et al. 2017 to say how far from convex it is);
   * **degenerate**: no negative (or no positive) eigenvalue but some zero ones, or all zero:
     the second-order test is inconclusive (flat directions; e.g. ``x^4`` at 0, or a network
     minimum with its usual flat directions).

Where the error bounds come from:

* **dense** (:func:`dense_eigenvalues`): a symmetric eigensolver is backward stable, so by
  Weyl's perturbation theorem each computed eigenvalue is within ``||E||_2 <= n eps ||H||_2`` of
  an exact one (Golub & Van Loan 2013, ch. 8; ``eps`` of the solver's float64). The
  matrix's own rounding (formed in float32 or float64 by autograd) adds ``sqrt(n) eps_formed
  ||H||`` (the probabilistic bound of an n-term sum, Higham & Mary 2019) plus the measured
  antisymmetric part ``||(H - H^T) / 2||_2``, a direct sample of that rounding.
* **Lanczos** (:func:`lanczos_errors`): for a symmetric operator, some eigenvalue lies within
  the Ritz pair's residual ``||A y - theta y||`` of ``theta`` (Parlett 1998, ch. 4, residual
  bounds); the products' rounding adds ``sqrt(n) eps_formed max|theta|`` and the float64
  arithmetic ``n eps64 max|theta|``, the same terms as the dense bound.

Only the extremes of the spectrum matter for rule 2: ``lambda_max`` and ``lambda_min`` decide;
the counts are over the eigenvalues actually computed (top-k and bottom-k), so the number of
negative eigenvalues is a lower bound (and a Krylov method can miss an eigenvalue entirely: see
the solver's ``converged`` flag). Without ``lambda_min`` (no bottom eigenvalue computed) a point
with positive top eigenvalues is reported as ``unknown``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

KINDS = ("minimum", "maximum", "saddle", "degenerate", "not-critical", "unknown")
GRAD_TOL = 1e-3
EPS64 = torch.finfo(torch.float64).eps


@dataclass
class CriticalPoint:
    """``kind`` (one of :data:`KINDS`), ``curvature`` (the eigenvalue-only verdict, the same as
    ``kind`` at a critical point), counts among the computed eigenvalues, ``neg_pos_ratio``
    (|lambda_min| / lambda_max, None unless both signs occur), ``zero_tol`` (the largest error
    bound of the eigenvalues that decided) and a one-line ``reason``."""

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


def _sign(value: float, err: float) -> int:
    return 1 if value > err else (-1 if value < -err else 0)


def _curvature_kind(s_max: int, s_min: Optional[int]) -> str:
    if s_min is None:
        return "maximum" if s_max < 0 else "unknown"
    if s_min > 0:
        return "minimum"
    if s_max < 0:
        return "maximum"
    if s_min < 0 and s_max > 0:
        return "saddle"
    return "degenerate"


def _errors(values: Sequence[float], errors: Optional[Sequence[float]], scale: float) -> list:
    if errors is None:  # values taken as exact up to their own float64 rounding
        return [len(values) * EPS64 * scale] * len(values)
    if len(errors) != len(values):
        raise ValueError(f"{len(errors)} error bounds for {len(values)} eigenvalues")
    return [float(e) if math.isfinite(float(e)) else math.inf for e in errors]


def classify_point(
    grad_norm: float,
    top: Sequence[float],
    bottom: Sequence[float] = (),
    *,
    top_errors: Optional[Sequence[float]] = None,
    bottom_errors: Optional[Sequence[float]] = None,
    grad_tol: float = GRAD_TOL,
) -> CriticalPoint:
    """Classify from the gradient norm and computed eigenvalues (module docstring for the rules).

    Args:
        grad_norm: ``||grad L||`` at the point.
        top: the largest eigenvalues (any order, at least one).
        bottom: the smallest eigenvalues (any order; empty if not computed).
        top_errors, bottom_errors: an error bound per eigenvalue (same order as ``top`` and
            ``bottom``; :func:`dense_eigenvalues` or :func:`lanczos_errors`). None: the values
            are exact up to float64 rounding (``len * eps64 * max|lambda|``).
        grad_tol: gradient norm above which the point is not critical.
    """
    if not top:
        raise ValueError("classify_point needs at least lambda_max")
    top, bottom = [float(v) for v in top], [float(v) for v in bottom]
    scale = max(abs(v) for v in top + bottom)
    pairs = list(zip(top, _errors(top, top_errors, scale))) + list(zip(bottom, _errors(bottom, bottom_errors, scale)))
    distinct = dict(sorted(pairs))  # one entry per distinct value (top and bottom may overlap)
    lam_max, err_max = max(pairs)
    lam_min, err_min = min(zip(bottom, _errors(bottom, bottom_errors, scale))) if bottom else (None, None)
    signs = [_sign(v, e) for v, e in distinct.items()]
    neg, pos = signs.count(-1), signs.count(1)
    zero = len(signs) - neg - pos
    s_max = _sign(lam_max, err_max)
    s_min = None if lam_min is None else _sign(lam_min, err_min)
    curvature = _curvature_kind(s_max, s_min)
    ratio = abs(lam_min) / lam_max if curvature == "saddle" else None
    zero_tol = max(err_max, err_min if err_min is not None else 0.0)
    spectrum = (f"lambda_max={lam_max:.4g} (+-{err_max:.2g})"
                + (f", lambda_min={lam_min:.4g} (+-{err_min:.2g})" if lam_min is not None else ""))
    if grad_norm > grad_tol:
        return CriticalPoint("not-critical", curvature, neg, pos, zero, ratio, grad_norm, zero_tol,
                             f"gradient norm {grad_norm:.3g} > grad_tol {grad_tol:g}; curvature there: {curvature} ({spectrum})")
    reasons = {
        "minimum": f"all computed eigenvalues positive beyond their error bounds ({spectrum})",
        "maximum": f"all computed eigenvalues negative beyond their error bounds ({spectrum})",
        "saddle": f"{neg} negative eigenvalue(s) found, |lambda_min|/lambda_max = {ratio if ratio is None else round(ratio, 4)} ({spectrum})",
        "degenerate": f"an extreme eigenvalue is zero within its error bound (flat direction): "
                      f"second-order test inconclusive ({spectrum})",
        "unknown": f"lambda_min not computed (ask for bottom eigenvalues) ({spectrum})",
    }
    return CriticalPoint(curvature, curvature, neg, pos, zero, ratio, grad_norm, zero_tol, reasons[curvature])


def dense_eigenvalues(H: Tensor) -> tuple[Tensor, float]:
    """Eigenvalues (n,) ascending float64 of the symmetric part of ``H`` (n, n) and their common
    error bound ``n eps64 ||H|| + sqrt(n) eps(H.dtype) ||H|| + ||(H - H^T)/2||_2`` (module docstring).

    ``H`` should be passed in the dtype it was formed in (float32 for a float32 model), so that
    the bound knows its precision.
    """
    n = H.shape[0]
    eps_formed = torch.finfo(H.dtype).eps if H.dtype.is_floating_point else EPS64
    Hd = H.detach().to(torch.float64)
    skew = float(torch.linalg.matrix_norm((Hd - Hd.T) / 2, ord=2)) if n else 0.0
    ev = torch.linalg.eigvalsh((Hd + Hd.T) / 2)
    scale = float(ev.abs().max()) if n else 0.0
    return ev, (n * EPS64 + math.sqrt(n) * eps_formed) * scale + skew


def lanczos_errors(values: Tensor, residuals: Tensor, n: int, dtype: torch.dtype, *,
                   scale: Optional[float] = None, tol: Optional[float] = None) -> list:
    """Error bound of each Ritz value: its residual plus ``sqrt(n) eps(dtype) scale`` for the
    rounding of the operator's products (``scale`` = largest |eigenvalue| known, default
    ``max|values|``), and the Ritz values' own float64 rounding ``n eps64 scale`` as for the
    dense solver. A residual that the solver does not report (NaN: ARPACK) is replaced by
    ARPACK's own stopping rule ``tol |theta|`` when ``tol`` is given, else the bound is infinite."""
    vals = [float(v) for v in values]
    scale = max((abs(v) for v in vals), default=0.0) if scale is None else float(scale)
    floor = (n * EPS64 + math.sqrt(n) * torch.finfo(dtype).eps) * scale
    out = []
    for v, r in zip(vals, [float(r) for r in residuals]):
        if math.isnan(r):
            r = tol * abs(v) if tol is not None else math.inf
        out.append(r + floor)
    return out


def classify_function(fn: Callable[[Tensor], Tensor], point: Tensor, *, grad_tol: float = GRAD_TOL) -> CriticalPoint:
    """Classify ``point`` (d,) of a scalar function ``fn`` using its exact gradient and Hessian
    (``torch.autograd.functional``, float64); for low-dimensional functions and teaching."""
    x = point.detach().to(torch.float64)
    g = torch.autograd.functional.jacobian(fn, x)
    H = torch.autograd.functional.hessian(fn, x)
    ev, err = dense_eigenvalues(H)
    vals = ev.tolist()
    return classify_point(float(torch.linalg.vector_norm(g.double())), vals, vals,
                          top_errors=[err] * len(vals), bottom_errors=[err] * len(vals), grad_tol=grad_tol)
