"""Extremal eigenvalues from a block Krylov space: many products per pass over the data.

When every product ``A V`` is a pass over a data stream (:class:`~gradlab.curvature.streamed.StreamedOperator`),
a pass costs reading and decoding the data, a forward pass and a gradient with its graph, and
then one double backward per column of ``V``. The columns are the cheap part, so a solver
should ask for several per pass. :func:`block_eigsh` builds the block Krylov space

    K_m = span[Q_0, A Q_0, ..., A^(m-1) Q_0],    Q_0 (n, b) random orthonormal,

one block product (one pass) per step, orthogonalising each new block against all earlier ones
(twice: "twice is enough", Giraud et al. 2005) in float64, and keeps the images ``A K``. The
Rayleigh-Ritz step on ``T = K^T (A K)`` then gives Ritz pairs ``(theta, y = K s)`` whose residuals
``||A y - theta y|| = ||(A K) s - theta K s||`` are computed exactly from the stored images, not
estimated. Stopping rule and its meaning are those of :func:`~gradlab.curvature.eigsh`: each of
the ``k`` wanted pairs has residual ``<= tol * max(|theta|, ZERO_FLOOR * ||A||_est)``, so its
eigenvalue error is at most ``tol`` relative (typically ``residual^2 / gap``). This is block
Lanczos with full reorthogonalisation (Golub & Underwood 1977; Golub & Van Loan, Matrix
Computations, 10.3.6); a block of ``b`` also converges for the top eigenvalue at the rate set by
the gap to the ``(b+1)``-th, so clustered top eigenvalues, common in network Hessians, cost few
passes. A column that becomes dependent on the basis (an invariant subspace) is replaced by a
fresh random direction orthogonal to it.

When it pays: a pass of ``b`` columns costs the reading and the gradient graph once plus ``b``
double backwards. Where reading dominates (small images decoded from files) ``b = 8`` took
3-4x fewer passes than Lanczos and less time; where the double backward dominates (a CNN on
3x32x32 inputs) and a few passes suffice, it cost far more than one product per pass
(``benchmarks/bench_data.py``, figures in ``benchmarks/RESULTS.md``). It is a library solver;
the probes keep Lanczos.
"""

from __future__ import annotations

from typing import Optional

import torch

from gradlab.core.errors import GradlabError, check
from gradlab.curvature.eigen import WHICH, ZERO_FLOOR, EigenResult
from gradlab.curvature.operator import as_operator
from gradlab.curvature.sampling import gaussian, make_generator

_F64 = torch.float64
#: A new column whose norm after orthogonalisation is below this fraction of its norm before is
#: treated as dependent on the basis.
DEFLATION_RTOL = 1e-10


def _orthonormal_block(W: torch.Tensor, K: Optional[torch.Tensor], gen) -> torch.Tensor:
    """Columns of ``W`` orthogonalised against ``K`` (twice) and among themselves; a dependent
    column is replaced by a random one orthogonal to everything."""
    norms = W.norm(dim=0).clamp_min(1e-300)
    for _ in range(2):
        if K is not None:
            W = W - K @ (K.T @ W)
    Q, R = torch.linalg.qr(W)
    weak = R.diagonal().abs() < DEFLATION_RTOL * norms
    if bool(weak.any()):
        fresh = gaussian((W.shape[0], int(weak.sum())), gen).to(W)
        basis = Q[:, ~weak] if K is None else torch.cat([K, Q[:, ~weak]], dim=1)
        for _ in range(2):
            fresh = fresh - basis @ (basis.T @ fresh)
        Q = torch.cat([Q[:, ~weak], torch.linalg.qr(fresh)[0]], dim=1)
    return Q


def block_eigsh(A, k: int = 1, which: str = "LA", *, block: int = 4, tol: float = 1e-3,
                max_passes: Optional[int] = None, return_vectors: bool = False,
                seed: Optional[int] = 0) -> EigenResult:
    """The ``k`` largest ("LA") or smallest ("SA") eigenvalues of the symmetric ``A`` (module docstring).

    Args:
        A: a :class:`~gradlab.curvature.operator.CurvatureOperator` or a dense (n, n) tensor.
        k: how many (``1 <= k <= block``).
        block: columns per product (one pass over the data each for a streamed operator).
        tol: relative residual tolerance (> 0).
        max_passes: cap on block products; default ``max(40, 4 k)`` (never past ``n`` columns).
        seed: seeds the random start block (None: the global generator).
    Returns:
        An :class:`~gradlab.curvature.eigen.EigenResult`; ``num_matvecs`` counts columns
        (``block`` per pass), ``residuals`` are exact.
    """
    op = as_operator(A)
    n = op.n
    check(isinstance(k, int) and 1 <= k <= n, f"invalid k: {k} (must be in 1..{n})")
    check(isinstance(block, int) and block >= k, f"invalid block: {block} (must be an integer >= k={k})")
    check(tol > 0, f"invalid tol: {tol} (must be > 0)")
    if which not in WHICH:
        raise GradlabError(f"unknown which {which!r}; choose from: {', '.join(WHICH)}")
    max_passes = max(40, 4 * k) if max_passes is None else int(max_passes)
    check(max_passes >= 1, f"invalid max_passes: {max_passes} (must be >= 1)")
    gen = make_generator(seed)
    block = min(block, n)
    Q = _orthonormal_block(gaussian((n, block), gen).to(_F64), None, gen)
    K = AK = None
    start, sign, converged, passes = op.num_matvecs, (1.0 if which == "LA" else -1.0), False, 0
    while True:
        W = op.matmat(Q.to(op.device)).to(Q)  # one pass: b products
        passes += 1
        K = Q if K is None else torch.cat([K, Q], dim=1)
        AK = W if AK is None else torch.cat([AK, W], dim=1)
        T = K.T @ AK
        theta, S = torch.linalg.eigh((T + T.T) / 2)
        order = torch.argsort(sign * theta, descending=True)[:k]
        theta_k, S_k = theta[order], S[:, order]
        res = (AK @ S_k - (K @ S_k) * theta_k).norm(dim=0)
        floor = ZERO_FLOOR * max(float(theta.abs().max()), 1e-300)
        converged = bool((res <= tol * theta_k.abs().clamp_min(floor)).all())
        if converged or K.shape[1] >= n or passes >= max_passes:
            break
        Q = _orthonormal_block(W, K, gen)[:, : n - K.shape[1]]
    vectors = K @ S_k if return_vectors else None
    return EigenResult(theta_k, vectors, op.num_matvecs - start, converged or K.shape[1] >= n, res, which)


__all__ = ["block_eigsh"]
