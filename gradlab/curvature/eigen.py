"""Extremal eigenvalues of a symmetric operator: top-k ("LA") or bottom-k ("SA").

Two methods behind one call:

* ``"lanczos"`` (default): :class:`~gradlab.curvature.lanczos.Lanczos` with full
  reorthogonalisation in float64, no restarts, stopping as soon as each of the ``k`` wanted Ritz
  pairs has residual ``||A y - theta y|| <= tol * max(|theta|, ZERO_FLOOR * ||A||_est)``
  (``||A||_est`` = largest |Ritz value|). For a symmetric matrix the eigenvalue error is at most
  the residual (so relative error <= tol) and typically ``residual^2 / gap`` (Parlett 1998,
  ch. 11): the default ``tol=1e-3`` gives top eigenvalues far more accurate than 1e-3 (measured:
  ~1e-7 relative on the top-5 of a digits MLP Hessian in 15 products). Bottom eigenvalues of
  network Hessians sit next to a dense bulk near 0 and need many more products.
* ``"scipy"``: ARPACK's implicitly restarted Lanczos (``scipy.sparse.linalg.eigsh``) through a
  ``LinearOperator``; products in the operator's dtype, ARPACK's own tolerance semantics.

Repeated eigenvalues: one Krylov sequence finds each distinct eigenvalue once; the Lanczos
method restarts from a fresh random vector on breakdown, which recovers multiplicities only when
the space is exhausted. Never returns an unconverged value without ``converged=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from gradlab.curvature.lanczos import Lanczos
from gradlab.curvature.operator import as_operator
from gradlab.curvature.sampling import gaussian, make_generator
from gradlab.core.errors import GradlabError, check

WHICH = ("LA", "SA")
METHODS = ("lanczos", "scipy")

#: eigenvalues smaller than this fraction of the largest |Ritz value| are held to an absolute
#: (not relative) accuracy of ``tol * ZERO_FLOOR * ||A||``: near-zero eigenvalues would never converge
#: relative to themselves.
ZERO_FLOOR = 1e-4


@dataclass
class EigenResult:
    """Eigenvalues ``values`` (k,) float64 ordered from the extreme inward (descending for "LA",
    ascending for "SA"); ``vectors`` (n, k) float64 unit columns or None; ``num_matvecs`` used;
    ``converged`` for all k; ``residuals`` (k,) = ``||A y - theta y||`` estimates."""

    values: Tensor
    vectors: Optional[Tensor]
    num_matvecs: int
    converged: bool
    residuals: Tensor
    which: str = "LA"


def eigsh(
    A,
    k: int = 1,
    which: str = "LA",
    *,
    tol: float = 1e-3,
    max_iter: Optional[int] = None,
    return_vectors: bool = False,
    method: str = "lanczos",
    seed: Optional[int] = 0,
    v0: Optional[Tensor] = None,
    sync_free: Optional[bool] = None,
) -> EigenResult:
    """The ``k`` largest ("LA") or smallest ("SA") eigenvalues of the symmetric ``A``.

    Args:
        A: a :class:`~gradlab.curvature.operator.CurvatureOperator` or a dense (n, n) tensor.
        k: how many, 1 <= k <= n.
        which: "LA" (largest algebraic) or "SA" (smallest algebraic).
        tol: relative residual tolerance (> 0), see the module docstring.
        max_iter: cap on matrix-vector products (Lanczos steps); default ``min(n, max(20 k, 150))``.
        return_vectors: also return the Ritz vectors (n, k).
        sync_free: :class:`~gradlab.curvature.lanczos.Lanczos`'s (default: True off the CPU); then
            the convergence test is the one value a step reads back to the host.
        method: "lanczos" or "scipy".
        seed: seeds the random start vector (None: global RNG); ``v0`` (n,) overrides it.
    Returns:
        :class:`EigenResult`.
    Raises:
        GradlabError: for k < 1, k > n, tol <= 0, an unknown ``which`` or ``method``.
    """
    op = as_operator(A)
    n = op.n
    check(isinstance(k, int) and k >= 1, f"invalid k: {k} (must be >= 1)")
    check(k <= n, f"invalid k: {k} (the operator has only {n} eigenvalues)")
    check(tol > 0, f"invalid tol: {tol} (must be > 0)")
    check(which in WHICH, f"unknown which {which!r}; choose from: {', '.join(WHICH)}")
    check(method in METHODS, f"unknown eigen method {method!r}; choose from: {', '.join(METHODS)}")
    max_iter = min(n, max(20 * k, 150)) if max_iter is None else int(max_iter)
    check(max_iter >= k, f"invalid max_iter: {max_iter} (must be >= k={k})")
    gen = make_generator(seed)
    if v0 is None:
        v0 = gaussian(n, gen)
    if method == "scipy":
        return _eigsh_scipy(op, k, which, tol, max_iter, return_vectors, v0)

    start = op.num_matvecs
    lz = Lanczos(op, v0.reshape(1, -1), generator=gen, max_steps=max_iter, sync_free=sync_free)  # one row: B = 1
    sign = 1.0 if which == "LA" else -1.0
    converged = False
    min_steps = min(n, k + 2)  # a few steps before trusting a residual (early Ritz values mislead)
    while True:
        lz.step()
        if lz.steps >= k:
            theta, S, res = (t[0] for t in lz.ritz())
            order = torch.argsort(sign * theta, descending=True)[:k]  # extreme first
            if lz.steps >= min_steps:  # the stopping rule: the one value read back per step
                floor = ZERO_FLOOR * theta.abs().max().clamp_min(1e-300)
                bound = tol * theta[order].abs().clamp_min(floor)
                converged = bool((res[order] <= bound).all())
        if converged or lz.exhausted or lz.steps >= max_iter:
            break
    if lz.steps < k:  # the space was exhausted before k steps (n < k is rejected above)
        raise GradlabError(f"found only {lz.steps} eigenvalues; k={k} is too many")
    vectors = lz.basis()[0].T @ S[:, order] if return_vectors else None
    return EigenResult(theta[order], vectors, op.num_matvecs - start, converged or lz.exhausted, res[order], which)


def _eigsh_scipy(op, k, which, tol, max_iter, return_vectors, v0) -> EigenResult:
    import numpy as np
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator
    from scipy.sparse.linalg import eigsh as arpack_eigsh

    start = op.num_matvecs

    def mv(x):
        v = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1)).to(op.device)
        return op.matvec(v).cpu().numpy()

    lin = LinearOperator((op.n, op.n), matvec=mv, dtype=np.float64)
    if k >= op.n - 1:  # ARPACK needs k < n - 1: small problems are solved densely
        A = op.to_dense().cpu().numpy()
        vals, vecs = np.linalg.eigh((A + A.T) / 2)
        converged = True
    else:
        try:
            vals, vecs = arpack_eigsh(lin, k=k, which=which, tol=tol, maxiter=max_iter, v0=v0.cpu().numpy())
            converged = True
        except ArpackNoConvergence as e:
            vals, vecs, converged = e.eigenvalues, e.eigenvectors, False
    order = np.argsort(-vals if which == "LA" else vals)[:k]
    vals_t = torch.from_numpy(np.asarray(vals)[order].copy())
    vecs_t = torch.from_numpy(np.asarray(vecs)[:, order].copy())
    res = torch.full((len(order),), float("nan"), dtype=torch.float64)  # ARPACK does not expose them
    return EigenResult(vals_t, vecs_t if return_vectors else None, op.num_matvecs - start, converged, res, which)
