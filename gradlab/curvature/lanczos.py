"""Lanczos tridiagonalisation with full reorthogonalisation (Lanczos 1950; Golub & Van Loan 10.1).

Shared by the eigenvalue solver (:mod:`gradlab.curvature.eigen`) and stochastic Lanczos
quadrature (:mod:`gradlab.curvature.density`). After ``m`` steps from a unit vector ``q_1``,

    A Q_m = Q_m T_m + beta_m q_{m+1} e_m^T,

with ``Q_m`` (n, m) orthonormal and ``T_m`` (m, m) symmetric tridiagonal (diagonal ``alphas``,
off-diagonal ``betas``). Every new vector is orthogonalised against all previous ones, in
float64, with a second pass when the first cancelled most of it ("twice is enough", Giraud et al.
2005), so Ritz values do not duplicate and the residual estimate ``|beta_m s_{m,i}|`` of a Ritz
pair stays reliable.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradlab.curvature.operator import CurvatureOperator

#: beta below this (relative to the largest |alpha|, beta seen) means the Krylov space is invariant.
BREAKDOWN_RTOL = 1e-10


class Lanczos:
    """Step-by-step Lanczos on ``op`` from ``v0`` (shape (n,)); the basis is kept in float64.

    Memory is at most ``2 * (steps + 1) * n`` float64 numbers (the buffer doubles), and never more
    than ``(max_steps + 1) * n`` when ``max_steps`` is given. On breakdown (an invariant subspace found) and
    when ``restart_on_breakdown`` is set, the process continues from a fresh random vector
    orthogonal to the basis, which lets it find further eigenvalues (e.g. repeated ones).
    """

    def __init__(
        self,
        op: CurvatureOperator,
        v0: Tensor,
        *,
        generator: torch.Generator | None = None,
        restart_on_breakdown: bool = True,
        max_steps: int | None = None,
    ):
        self.op, self.generator, self.restart = op, generator, restart_on_breakdown
        # the basis never needs more than max_steps + 1 rows: cap the buffer's doubling there
        self._cap = op.n + 1 if max_steps is None else min(op.n, max_steps) + 1
        q = v0.to(dtype=torch.float64, device=op.device)
        # basis rows in one growing buffer: (capacity, n), rows [0, num_vectors) are used. Start
        # with room for 48 rows when that is at most 256 MiB (growing copies the whole basis: on
        # a 564k-parameter model the copy at 16 rows cost 5% of a 20-product solve)
        first = 48 if 48 * op.n * 8 <= 2**28 else 16
        self._rows = torch.empty(min(first, self._cap), op.n, dtype=torch.float64, device=op.device)
        self._count = 0
        self._append(q, float(torch.linalg.vector_norm(q)))
        self.alphas: list[float] = []
        self.betas: list[float] = []  # betas[j] couples q_j and q_{j+1}
        self.exhausted = False  # the whole space is spanned: nothing left to add

    @property
    def steps(self) -> int:
        return len(self.alphas)

    def _append(self, q: Tensor, scale: float = 1.0) -> None:
        """Store ``q / scale`` as the next basis row (written straight into the buffer)."""
        if self._count == self._rows.shape[0]:
            size = max(self._count + 1, min(2 * self._count, self._cap))
            grown = torch.empty(size, self.op.n, dtype=torch.float64, device=self.op.device)
            grown[: self._count] = self._rows
            self._rows = grown
        torch.div(q, scale, out=self._rows[self._count])
        self._count += 1

    def _orthogonalise(self, w: Tensor) -> Tensor:
        """Classical Gram-Schmidt against the basis, repeated once when the first pass cancelled
        most of ``w`` (the DGKS criterion, Daniel et al. 1976: a second pass is needed only then)."""
        Q = self._rows[: self._count]  # (j, n)
        before = torch.linalg.vector_norm(w)
        w = w - Q.T @ (Q @ w)
        if torch.linalg.vector_norm(w) < 0.7071 * before:
            w = w - Q.T @ (Q @ w)
        return w

    def step(self) -> None:
        """One more product ``A q_j``; extends ``alphas``, ``betas`` and the basis."""
        q = self._rows[self._count - 1]
        w = self.op.matvec(q)
        if w.untyped_storage().data_ptr() == self._rows.untyped_storage().data_ptr():
            w = w.clone()  # an operator that hands back its input (the identity): updated in place below
        alpha = float(torch.dot(q, w))
        self.alphas.append(alpha)
        # The three-term recurrence first (w - alpha q_j - beta_{j-1} q_{j-1}), then the full
        # reorthogonalisation only removes the small components rounding left: the DGKS test then
        # rarely asks for a second pass. Orthogonalising the raw A q_j against everything at once
        # cancelled most of it every step (17 of 18 steps took two passes over the basis, the
        # basis being 4.5 MB per row in float64 on a 564k-parameter model).
        w.add_(q, alpha=-alpha)
        if self.betas and self.betas[-1] != 0.0:  # 0: a restart, q_{j-1} is not coupled to q_j
            w.add_(self._rows[self._count - 2], alpha=-self.betas[-1])
        w = self._orthogonalise(w)
        beta = float(torch.linalg.vector_norm(w))
        scale = max([abs(a) for a in self.alphas] + self.betas + [1e-300])
        if self._count >= self.op.n:
            self.exhausted = True
            self.betas.append(0.0)
            return
        if beta <= BREAKDOWN_RTOL * scale:
            self.betas.append(0.0)
            if not self.restart:
                self.exhausted = True
                return
            w = torch.randn(self.op.n, generator=self.generator, dtype=torch.float64).to(self.op.device)
            w = self._orthogonalise(w)
            self._append(w, float(torch.linalg.vector_norm(w)))
            return
        self.betas.append(beta)
        self._append(w, beta)

    def tridiagonal(self) -> Tensor:
        """``T_m`` as a dense (m, m) float64 matrix."""
        m = self.steps
        T = torch.diag(torch.tensor(self.alphas, dtype=torch.float64))
        if m > 1:
            off = torch.tensor(self.betas[: m - 1], dtype=torch.float64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        return T

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values ``theta`` (m,) ascending, eigenvectors ``S`` (m, m) of ``T_m`` and residual
        estimates ``|beta_m * S[m-1, i]|`` (m,) = ``||A y_i - theta_i y_i||`` for Ritz vectors ``y_i``."""
        theta, S = torch.linalg.eigh(self.tridiagonal())
        beta_m = self.betas[-1] if self.betas else 0.0
        return theta, S, (beta_m * S[-1, :]).abs()

    def basis(self) -> Tensor:
        """``Q_m`` as (n, m) float64."""
        return self._rows[: self.steps].T
