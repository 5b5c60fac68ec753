"""Lanczos tridiagonalisation with full reorthogonalisation, for one or many operators at once
(Lanczos 1950; Golub & Van Loan, Matrix Computations, 10.1).

The one Lanczos core of the curvature engine: the eigenvalue solver
(:mod:`gradlab.curvature.eigen`), stochastic Lanczos quadrature (:mod:`~gradlab.curvature.density`),
the Krylov trace estimator (:mod:`~gradlab.curvature.trace`) and the batched per-example solver
(:mod:`~gradlab.curvature.batched`: input Hessians in the curvature attack, Jacobian Gram matrices
in the Jacobian probe) all run :class:`Lanczos`.

It runs ``B`` independent recurrences side by side (``B = 1`` for a single operator). After ``m``
steps from unit vectors ``q_{b,1}``,

    A_b Q_b = Q_b T_b + beta_{b,m} q_{b,m+1} e_m^T,    b = 1..B,

with ``Q_b`` (n, m) orthonormal and ``T_b`` (m, m) symmetric tridiagonal (diagonal ``alpha``,
off-diagonal ``beta``). Each new vector has the three-term recurrence subtracted and is then
orthogonalised against the whole basis, in float64 whatever the operator's dtype (a float32
norm can be off by ~1e-4 relative on long vectors), with a second pass where the first cancelled
most of it (DGKS criterion, Daniel, Gragg, Kaufman & Stewart 1976; "twice is enough", Giraud et
al. 2005). So Ritz values do not duplicate and the residual estimate ``|beta_m s_{m,i}|`` of a
Ritz pair stays reliable (Paige 1971/1980).

Breakdown (``beta`` below ``breakdown_tol`` times the row's largest ``|alpha|, beta``) means the
row's Krylov space is invariant. With ``restart_on_breakdown`` the row continues from a fresh
Gaussian vector orthogonal to its basis (``T_b`` gets a zero coupling there, so it stays block
diagonal), which finds further copies of repeated eigenvalues. Without it the row is finished:
its later vectors are zero, which only adds decoupled zero rows to ``T_b`` (eigenvalue 0, zero
weight on the start vector).

Host reads: on a CPU, where reading a flag back costs nothing, the second orthogonalisation pass
and the restart are done only for the rows that need them. On an accelerator (``sync_free``, the
default off the CPU) a step reads nothing back: both run for every row and ``torch.where`` keeps
what each row needs, so the device never waits for the host inside the recurrence. The one read
left per step is the no-restart mode's "every row finished" test (its stopping rule).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from gradlab.curvature.operator import CurvatureOperator
from gradlab.curvature.sampling import gaussian

_F64 = torch.float64

#: beta below this (relative to the largest |alpha|, beta seen) means the Krylov space is invariant.
BREAKDOWN_RTOL = 1e-10


class Lanczos:
    """Step-by-step Lanczos from the start vectors ``v0`` (B, n); basis, alpha, beta in float64.

    Args:
        A: a :class:`~gradlab.curvature.operator.CurvatureOperator` (every row runs on it), or a
            batched product ``matvec(V)`` mapping ``V`` (B, n) to ``(A_1 v_1, ..., A_B v_B)``.
        v0: non-zero start rows (B, n). With a callable, their dtype is the dtype ``matvec``
            receives; its output is read in float64.
        generator: draws restart vectors (float64, on its own device).
        restart_on_breakdown: see the module docstring.
        max_steps: the basis never needs more than ``max_steps + 1`` rows (caps its buffer).
        breakdown_tol: relative breakdown threshold (default :data:`BREAKDOWN_RTOL`).
        sync_free: never read a flag back to the host inside a step (module docstring); default:
            True off the CPU.

    Attributes:
        steps: products so far (every row takes one per step); ``products`` counts them too.
        exhausted: the basis spans all n dimensions, or (without restarts) every row broke down.
        block_start (B,) long: first step of each row's current Krylov block after a restart;
            -1 while a row is still in the block of its start vector.
        broken (B,) bool: which rows broke down at the last step.
    """

    def __init__(
        self,
        A: Union[CurvatureOperator, Callable[[Tensor], Tensor]],
        v0: Tensor,
        *,
        generator: Optional[torch.Generator] = None,
        restart_on_breakdown: bool = True,
        max_steps: Optional[int] = None,
        breakdown_tol: float = BREAKDOWN_RTOL,
        sync_free: Optional[bool] = None,
    ):
        if v0.ndim != 2:
            raise ValueError(f"v0 must be (B, D); got shape {tuple(v0.shape)}")
        self.op = A if isinstance(A, CurvatureOperator) else None
        self._matvec = A
        self.generator, self.restart, self.breakdown_tol = generator, restart_on_breakdown, breakdown_tol
        batch, n = v0.shape
        device = self.op.device if self.op is not None else v0.device
        self.n, self.batch, self.device, self._dtype = n, batch, device, v0.dtype
        self.sync_free = torch.device(device).type != "cpu" if sync_free is None else bool(sync_free)
        # restart vectors: sync-free steps draw one every step (kept only where a row broke down),
        # so off the CPU they come from a generator on the device, seeded once from the given one
        self._restart_gen = generator
        on_host = generator is None or generator.device.type == "cpu"
        if self.sync_free and restart_on_breakdown and torch.device(device).type != "cpu" and on_host:
            seed = torch.randint(0, 2**62, (1,), generator=generator).item()  # once, from a CPU generator
            self._restart_gen = torch.Generator(device=device).manual_seed(seed)
        # the basis never needs more than max_steps + 1 rows: cap the buffer's doubling there
        self._cap = n + 1 if max_steps is None else min(n, max_steps) + 1
        # basis rows in one growing buffer (B, capacity, n), rows [0, _count) used. Start with
        # room for 48 rows when that is at most 256 MiB: growing copies the whole basis
        first = 48 if 48 * batch * n * 8 <= 2**28 else 16
        self._rows = torch.empty(batch, min(first, self._cap), n, dtype=_F64, device=device)
        self._count = 0
        self._append(unit(v0.to(dtype=_F64, device=device)))
        self._alpha: list[Tensor] = []
        self._beta: list[Tensor] = []  # couplings: _beta[j] joins q_j and q_{j+1}; 0 at restarts
        self.last_beta = torch.zeros(batch, dtype=_F64, device=device)  # raw norm of the last step
        self.scale = torch.zeros(batch, dtype=_F64, device=device)  # largest |alpha|, beta per row
        self.block_start = torch.full((batch,), -1, dtype=torch.long, device=device)
        self.broken = torch.zeros(batch, dtype=torch.bool, device=device)
        self.stopped = torch.zeros(batch, dtype=torch.bool, device=device)  # no-restart breakdowns
        self.exhausted = False
        self.products = 0
        self._w: Optional[Tensor] = None

    @property
    def steps(self) -> int:
        return len(self._alpha)

    @property
    def alpha(self) -> Tensor:
        """Diagonals of ``T`` (B, m)."""
        return torch.stack(self._alpha, -1) if self._alpha else self._rows.new_zeros(self.batch, 0)

    @property
    def beta(self) -> Tensor:
        """Off-diagonals of ``T`` (B, m - 1) (zero at restarts)."""
        return torch.stack(self._beta[: self.steps - 1], -1) if self.steps > 1 else self._rows.new_zeros(self.batch, 0)

    def _append(self, q: Tensor) -> None:
        """Store the unit rows ``q`` (B, n) as the next basis vectors."""
        if self._count == self._rows.shape[1]:
            size = max(self._count + 1, min(2 * self._count, self._cap))
            grown = torch.empty(self.batch, size, self.n, dtype=_F64, device=self.device)
            grown[:, : self._count] = self._rows[:, : self._count]
            self._rows = grown
        self._rows[:, self._count] = q
        self._count += 1

    def _product(self, q: Tensor) -> Tensor:
        if self.op is None:
            w = self._matvec(q.to(self._dtype)).to(_F64)
        elif self.batch == 1:
            w = self.op.matvec(q[0]).unsqueeze(0)
        else:
            w = self.op.matmat(q.T).T.contiguous()
        self.products += 1
        if w.untyped_storage().data_ptr() == self._rows.untyped_storage().data_ptr():
            w = w.clone()  # an operator that hands back its input (the identity): updated in place below
        return w

    def orthogonalise(self, w: Tensor) -> Tensor:
        """``w`` (B, n) minus its components on each row's basis (see :func:`orthogonalise`)."""
        return orthogonalise(w.unsqueeze(1), self._rows[:, : self._count], twice=self.sync_free).squeeze(1)

    def expand(self) -> None:
        """The product ``A q_j`` and the next direction: appends ``alpha_j``, sets ``last_beta``
        (B,), ``broken`` and ``exhausted``. :meth:`commit` then extends the basis; a solver may
        inspect the Ritz pairs in between (with ``last_beta`` as the coupling)."""
        q = self._rows[:, self._count - 1]
        w = self._product(q)
        alpha = torch.linalg.vecdot(w, q)
        self._alpha.append(alpha)
        # The three-term recurrence first (w - alpha q_j - beta_{j-1} q_{j-1}), then the full
        # reorthogonalisation only removes what rounding left, so the DGKS test rarely asks for
        # a second pass over the basis (the raw A q_j would need one every step).
        w.addcmul_(alpha.unsqueeze(-1), q, value=-1.0)
        if self._beta:  # a zero coupling (restart) removes nothing
            w.addcmul_(self._beta[-1].unsqueeze(-1), self._rows[:, self._count - 2], value=-1.0)
        w = self.orthogonalise(w)
        b = torch.linalg.vector_norm(w, dim=-1)
        self.scale = torch.maximum(self.scale, torch.maximum(alpha.abs(), b))
        self.broken = (b <= self.breakdown_tol * self.scale) & ~self.stopped
        self.last_beta, self._w = b, w
        self.exhausted = self._count >= self.n  # the basis spans the space: T's eigenvalues are exact
        if not self.restart:
            self.exhausted |= bool((self.broken | self.stopped).all())

    def commit(self) -> None:
        """Record the coupling ``beta_j`` and append the next basis vectors (restarting broken
        rows when asked); nothing is appended once the run is exhausted."""
        w, b = self._w, self.last_beta
        self._w = None
        if self.exhausted:
            self._beta.append(torch.zeros_like(b))
            return
        if self.sync_free or bool(self.broken.any()):
            if self.restart:  # continue those rows in the orthogonal complement of their basis
                fresh = gaussian((self.batch, self.n), self._restart_gen, device=self.device)
                w = torch.where(self.broken.unsqueeze(-1), self.orthogonalise(fresh), w)
                self.block_start = torch.where(self.broken, torch.full_like(self.block_start, self.steps),
                                               self.block_start)
            else:
                self.stopped |= self.broken
            b = torch.where(self.broken, torch.zeros_like(b), b)
        w = unit(w)
        if not self.restart and (self.sync_free or bool(self.stopped.any())):
            w = torch.where(self.stopped.unsqueeze(-1), torch.zeros_like(w), w)
            b = torch.where(self.stopped, torch.zeros_like(b), b)
        self._beta.append(b)
        self._append(w)

    def step(self) -> None:
        """One more product per row: :meth:`expand` then :meth:`commit`."""
        self.expand()
        self.commit()

    def tridiagonal(self) -> Tensor:
        """``T`` as dense (B, m, m) float64."""
        return tridiagonal(self.alpha, self.beta)

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values ``theta`` (B, m) ascending, eigenvectors ``S`` (B, m, m) of ``T`` and
        residual estimates ``|beta_m S[:, m-1, i]|`` (B, m) = ``||A y_i - theta_i y_i||``."""
        theta, S = torch.linalg.eigh(self.tridiagonal())
        beta_m = self._beta[-1] if len(self._beta) == self.steps and self._beta else self.last_beta
        return theta, S, (beta_m.unsqueeze(-1) * S[:, -1, :]).abs()

    def basis(self, m: Optional[int] = None) -> Tensor:
        """The first ``m`` (default ``steps``) basis vectors as rows, (B, m, n) float64."""
        return self._rows[:, : self.steps if m is None else m]


def tridiagonal(alpha: Tensor, beta: Tensor) -> Tensor:
    """(B, m, m) from diagonals ``alpha`` (B, m) and off-diagonals ``beta`` (B, m - 1)."""
    t = torch.diag_embed(alpha)
    if beta.shape[-1]:
        t = t + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    return t


def orthogonalise(w: Tensor, Q: Tensor, twice: bool = False) -> Tensor:
    """Each vector of ``w`` (B, r, n) minus its components on the orthonormal rows of ``Q``
    (B, j, n): classical Gram-Schmidt, with a second pass for the vectors that the first
    cancelled below ``1/sqrt(2)`` of their norm (DGKS: only those lose orthogonality to rounding).
    ``twice``: the second pass for every vector, without reading the test back to the host."""

    def project_out(x):
        if x.shape[0] == 1 and x.shape[1] == 1:  # one vector: matrix-vector products, no batching
            q, v = Q[0], x[0, 0]
            return (v - q.T @ (q @ v)).view_as(x)
        return x - torch.bmm(torch.bmm(x, Q.transpose(1, 2)), Q)

    if twice:
        return project_out(project_out(w))
    before = torch.linalg.vector_norm(w, dim=-1)
    w = project_out(w)
    again = torch.linalg.vector_norm(w, dim=-1) < 0.7071 * before
    if bool(again.any()):
        w = torch.where(again.unsqueeze(-1), project_out(w), w)
    return w


def unit(v: Tensor) -> Tensor:
    """``v`` scaled to unit norm along its last dimension (zero rows stay zero)."""
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(torch.finfo(_F64).tiny)
