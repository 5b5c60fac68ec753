"""Batched Lanczos: extreme eigenpairs of many independent symmetric operators at once.

Per-example curvature (the input Hessian of each example, the Gram matrix ``J_i^T J_i`` of each
example's Jacobian) is a block-diagonal operator: one batched product ``V (B, D) -> (A_1 v_1,
..., A_B v_B)`` serves every example, so one Lanczos recurrence (Lanczos 1950, "An iteration
method for the solution of the eigenvalue problem of linear differential and integral
operators") runs for all ``B`` blocks side by side, each with its own tridiagonal matrix

    A_b Q_b = Q_b T_b + beta_b q_{b,m+1} e_m^T,    Q_b (D, m) orthonormal, T_b (m, m) tridiagonal.

The recurrence is the engine's one Lanczos core, :class:`gradlab.curvature.lanczos.Lanczos`, in
its batched mode (full reorthogonalisation in float64 whatever the operator's dtype); this module
adds what a per-example eigensolver needs on top: per-row stopping and exact resolution.

Krylov-space exhaustion is handled per example. When ``beta`` of a row drops below
``breakdown_tol`` times the row's scale (the largest ``|alpha|, beta`` seen), its Krylov space is
invariant; the core restarts the row from a fresh random vector orthogonal to its basis (``T_b`` gets a
zero off-diagonal there, so it stays block diagonal), which is how further copies of repeated
eigenvalues are found. If that random restart vector is itself an eigenvector (its block breaks
down at once), the rest of the space is almost surely one eigenspace and the row is resolved
exactly: rank-deficient operators (a ReLU net's input Hessian of rank <= classes - 1) and
identity-like remainders stop early this way. A row whose basis spans all ``D`` dimensions is
exact too. A row is otherwise done when its top-k Ritz residuals are below ``tol`` and, after a
restart, so is the residual of the current block's top Ritz pair (earlier blocks' pairs are exact,
but the complement may still hold a copy above the k-th value).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from gradlab.curvature.lanczos import Lanczos, orthogonalise, tridiagonal, unit
from gradlab.curvature.sampling import gaussian

_F64 = torch.float64


@dataclass
class BatchedEigenResult:
    """What :func:`batched_lanczos` returns, all float64.

    ``eigenvalues`` (B, k), descending (ascending with ``largest=False``); ``eigenvectors``
    (B, k, D) unit rows, or None unless asked for; ``residuals`` (B, k) estimates of
    ``||A_b v - lambda v||`` (0 where exact); ``converged`` (B,) bool, True where every one of
    the row's k pairs met the tolerance or its spectrum was resolved exactly (an unconverged
    row reports its current Ritz pairs); ``products``: batched operator products used (each
    is one product per example).
    """

    eigenvalues: Tensor
    residuals: Tensor
    converged: Tensor
    products: int
    eigenvectors: Optional[Tensor] = None


def batched_lanczos(
    matvec: Callable[[Tensor], Tensor],
    v0: Tensor,
    k: int = 1,
    *,
    max_iter: Optional[int] = None,
    tol: float = 1e-8,
    breakdown_tol: Optional[float] = None,
    largest: bool = True,
    return_vectors: bool = False,
    generator: Optional[torch.Generator] = None,
) -> BatchedEigenResult:
    """Top-``k`` (or bottom-``k``) eigenpairs of ``B`` independent symmetric operators.

    Args:
        matvec: maps ``V`` (B, D) in ``v0``'s dtype to ``(A_1 v_1, ..., A_B v_B)`` (B, D); its
            output is read in float64.
        v0: start vectors (B, D), non-zero rows; their dtype is the dtype ``matvec`` receives.
        k: eigenpairs per row (clipped to D).
        max_iter: at most this many products (default ``max(3k, 40)``; at least k, at most D).
        tol: a row is done when its k Ritz residuals are at most ``tol`` times its largest
            ``|Ritz value|``; ``0`` runs all ``max_iter`` products unless the spectrum is
            resolved exactly first.
        breakdown_tol: relative ``beta`` below which a Krylov space counts as invariant
            (default ``max(tol, 100 * eps(v0.dtype))``: a float32 operator leaves float32 noise).
        largest: False gives the k smallest eigenvalues (ascending), via ``-A``.
        return_vectors: also return the eigenvectors (B, k, D).
        generator: draws the restart vectors (in float64, on its own device).
    Returns:
        :class:`BatchedEigenResult`.
    """
    if v0.ndim != 2:
        raise ValueError(f"v0 must be (B, D); got shape {tuple(v0.shape)}")
    if not largest:  # bottom-k of A is minus the top-k of -A: same products, same guarantees
        res = batched_lanczos(lambda v: -matvec(v), v0, k, max_iter=max_iter, tol=tol,
                              breakdown_tol=breakdown_tol, return_vectors=return_vectors, generator=generator)
        res.eigenvalues = -res.eigenvalues
        return res
    batch, dim = v0.shape
    k = max(1, min(int(k), dim))
    steps = min(dim, max(k, int(max_iter) if max_iter is not None else max(3 * k, 40)))
    if breakdown_tol is None:
        breakdown_tol = max(tol, 100 * torch.finfo(v0.dtype).eps)
    lz = Lanczos(matvec, v0, generator=generator, max_steps=steps, breakdown_tol=breakdown_tol)
    acc = _Accepted(batch, k, steps + 1, lz.device)

    for j in range(steps):
        # A row whose block_start is -1 is still in the block of the caller's start vector, which
        # may be a chosen (non-random) eigenvector: its breakdown proves nothing about the complement.
        lz.expand()  # the product of step j; the basis is extended by commit() below
        b, broken = lz.last_beta, lz.broken
        single = broken & (lz.block_start == j) & ~acc.done
        exhausted = lz.exhausted  # the basis spans the space: Ritz values are eigenvalues
        last = exhausted or j + 1 == steps
        if tol > 0 or last or bool(single.any()):
            theta, s, resid = lz.ritz()  # ascending; resid (B, j+1) = |beta_j s_{j,i}|
            if exhausted:
                acc.take(~acc.done, theta, s, resid.zero_())
                break
            if bool(single.any()):  # the complement is one eigenspace with eigenvalue alpha_j
                acc.take(single, theta, s, resid, fill=lz.alpha[:, j], n_fill=dim - j - 1)
            if j + 1 >= k:
                order = theta.argsort(-1, descending=True)[:, :k]
                bound = tol * theta.abs().amax(-1)
                ok = (resid.gather(-1, order) <= bound.unsqueeze(-1)).all(-1)
                if bool((lz.block_start > 0).any()):
                    # After a restart, earlier blocks' Ritz pairs are exact (residual 0) but the
                    # complement may hold more copies above the k-th value: wait until the current
                    # block's top Ritz pair, which converges to the complement's top, has converged.
                    ok &= _current_block_top_residual(lz.alpha, lz.beta, lz.block_start, b) <= bound
                acc.take(ok & ~broken, theta, s, resid)
            if last:
                converged = acc.done.clone()
                acc.take(~acc.done, theta, s, resid)  # current Ritz pairs, flagged unconverged
                break
        if bool(acc.done.all()):
            converged = acc.done.clone()
            break
        lz.commit()  # restarts broken rows in the orthogonal complement of their basis
    if exhausted:
        converged = torch.ones(batch, dtype=torch.bool, device=lz.device)
    vectors = acc.vectors(lz.basis(), generator) if return_vectors else None
    return BatchedEigenResult(acc.values, acc.resid, converged, lz.products, vectors)


class _Accepted:
    """Per-row results frozen when a row is done: values (B, k), residuals (B, k), the Ritz
    vectors as coefficients (B, k, m) on the Krylov basis, and which slots are copies of the
    complement's single eigenvalue (no Ritz vector: drawn orthogonal to the basis at the end)."""

    def __init__(self, batch: int, k: int, m: int, device):
        self.k = k
        self.values = torch.zeros(batch, k, dtype=_F64, device=device)
        self.resid = torch.zeros(batch, k, dtype=_F64, device=device)
        self.coef = torch.zeros(batch, k, m, dtype=_F64, device=device)
        self.fill = torch.zeros(batch, k, dtype=torch.bool, device=device)
        self.n_basis = torch.zeros(batch, dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)

    def take(self, rows: Tensor, theta: Tensor, s: Tensor, resid: Tensor,
             fill: Optional[Tensor] = None, n_fill: int = 0) -> None:
        """Freeze ``rows`` (B,) bool (not yet done) with the top-k of their Ritz values ``theta``
        (B, n) and, when ``n_fill > 0``, ``n_fill`` more copies of ``fill`` (B,)."""
        rows = rows & ~self.done
        if not bool(rows.any()):
            return
        n = theta.shape[-1]
        n_fill = max(0, min(self.k, n_fill))
        values = theta
        if n_fill:
            values = torch.cat([theta, fill.unsqueeze(-1).expand(-1, n_fill)], -1)
        order = values.sort(dim=-1, descending=True, stable=True).indices[:, : self.k]  # (B, k)
        is_fill = order >= n
        ritz = order.clamp_max(n - 1)
        coef = s.transpose(1, 2).gather(1, ritz.unsqueeze(-1).expand(-1, -1, n))  # (B, k, n)
        coef = torch.where(is_fill.unsqueeze(-1), torch.zeros_like(coef), coef)
        res = torch.where(is_fill, torch.zeros_like(values[:, : self.k]), resid.gather(-1, ritz))
        self.values[rows] = values.gather(-1, order)[rows]
        self.resid[rows] = res[rows]
        self.coef[rows] = torch.nn.functional.pad(coef, (0, self.coef.shape[-1] - n))[rows]
        self.fill[rows] = is_fill[rows]
        self.n_basis[rows] = n
        self.done |= rows

    def vectors(self, basis: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        """Eigenvectors (B, k, D): Ritz vectors, and for complement copies an orthonormal set
        orthogonal to the row's basis (any such set spans part of that eigenspace)."""
        m = basis.shape[1]  # rows used; coefficients beyond them are zero padding
        vec = torch.einsum("bkm,bmd->bkd", self.coef[..., :m], basis)
        for row in self.fill.any(-1).nonzero().flatten().tolist():
            slots = self.fill[row].nonzero().flatten()
            q = basis[row, : int(self.n_basis[row])]  # (n, D)
            r = gaussian((len(slots), basis.shape[-1]), generator, device=basis.device)
            r = orthogonalise(r.unsqueeze(0), q.unsqueeze(0))[0]
            vec[row, slots] = torch.linalg.qr(r.T)[0].T
        return unit(vec)


def _current_block_top_residual(alpha: Tensor, beta: Tensor, block_start: Tensor, b: Tensor) -> Tensor:
    """Residual ``|b s_last|`` (B,) of the top Ritz pair of each row's current (last) block of T.

    T is block diagonal (zero couplings at restarts), so the current block's eigenvalues are a
    subset of T's: earlier rows are pushed below all of them (Gershgorin) and decoupled.
    """
    m = alpha.shape[-1]
    before = torch.arange(m, device=alpha.device).unsqueeze(0) < block_start.unsqueeze(-1)  # (B, m)
    off = torch.cat([beta.abs(), beta.new_zeros(beta.shape[0], 1)], -1)
    low = (alpha - off - torch.cat([beta.new_zeros(beta.shape[0], 1), beta.abs()], -1)).amin(-1, keepdim=True)
    diag = torch.where(before, low - 1.0, alpha)
    _, s = torch.linalg.eigh(tridiagonal(diag, torch.where(before[:, 1:], 0.0, beta)))
    return (b * s[:, -1, -1]).abs()
