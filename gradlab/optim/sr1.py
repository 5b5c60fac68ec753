"""Limited-memory symmetric rank-one (L-SR1) updates inside a trust region.

SR1 corrects the model Hessian by the rank-one term that makes it reproduce the last curvature
pair ``(s, y)`` (``y`` the change of the gradient over the step ``s``)::

    B+ = B + r r^T / (r^T s),   r = y - B s      (Nocedal & Wright 2006, eq. 6.24)

skipped when ``|s^T r| < skip_tol ||s|| ||r||`` (eq. 6.26, r ~ 1e-8), which keeps the update
bounded. Unlike BFGS, ``B+`` need not be positive definite: on ``x^2 - y^2`` two steps recover the
exact Hessian, with its eigenvalue -2, and the trust-region step then follows that direction
downhill instead of settling at the saddle. On a strictly convex quadratic with independent steps,
``B`` equals the Hessian after n updates (N&W Thm 6.1), so the (n+1)-th step is exact.

Memory: the last ``history_size`` pairs in the compact form of Byrd, Nocedal & Schnabel (1994,
Thm 5.1), ``B = gamma I + Psi M^{-1} Psi^T`` with ``Psi = Y - gamma S`` and
``M = D + L + L^T - gamma S^T S`` (``S^T Y = L + D + U``). A thin QR of ``Psi`` and an eigen-
decomposition of ``R M^{-1} R^T`` turn it into ``B = gamma I + P diag(lam) P^T``, where the
trust-region subproblem is solved exactly (:mod:`gradlab.optim.trust_region`). Pairs whose ``M``
is numerically singular (more pairs than dimensions, or a new ``gamma``) are dropped oldest first.
``gamma = y^T y / s^T y`` of the newest pair with ``s^T y > 0`` (1 before any).

Each step (N&W Algorithm 6.2, with the radius rule of Algorithm 4.1): evaluate ``f, g`` (the
closure; this loss is the step's), solve for ``p`` with ``||p|| <= radius``, evaluate at
``x + p``; accept when ``rho = (f(x) - f(x + p)) / (model decrease) > eta``; update ``B`` with the
pair whether or not it was accepted; double the radius when ``rho > 0.75`` and ``p`` reached
``0.8 radius``, set it to half the step length when ``rho < 0.1``. ``lr`` is the initial radius. Two closure evaluations
per step; with mini-batches both see the same batch, so ``y`` is a consistent difference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from gradlab.core.options import Option, Options
from gradlab.optim.closure import add_to_params, evaluate, set_grads
from gradlab.optim.newton import work_dtype
from gradlab.optim.registry import OPTIMIZERS
from gradlab.optim.trust_region import eigen_trust_step
from gradlab.optim.state import ExtraState

OPTIONS = Options(
    Option("lr", float, 1.0, "initial trust-region radius", low=0, low_open=True),
    Option("history_size", int, 10, "curvature pairs (s, y) kept in the compact SR1 representation", low=1,
           paper="Byrd, Nocedal & Schnabel 1994"),
    Option("skip_tol", float, 1e-8, "skip the update when |s^T (y - Bs)| < skip_tol ||s|| ||y - Bs||", low=0,
           high=1, paper="Nocedal & Wright 2006, eq. 6.26"),
    Option("eta", float, 1e-4, "accept a step when actual / predicted decrease exceeds this", low=0, high=0.25,
           high_open=True, paper="Nocedal & Wright 2006, Alg. 6.2"),
)

MAX_RADIUS = 1e8
COND_LIMIT = 1e-10  # smallest |eig(M)| relative to the largest for a pair set to be kept


def compact_eigen(S: Tensor, Y: Tensor, gamma: float) -> tuple[Tensor, Tensor, int]:
    """``(P, lam, k)``: ``B = gamma I + P diag(lam) P^T`` from the newest ``k`` usable pairs.

    ``S``, ``Y`` hold one pair per row, oldest first (module docstring).
    """
    n = S.shape[1]
    for k in range(min(S.shape[0], n), 0, -1):
        s, y = S[-k:], Y[-k:]
        sy = s @ y.T
        M = torch.tril(sy, -1) + torch.tril(sy, -1).T + torch.diag(torch.diagonal(sy)) - gamma * (s @ s.T)
        ev = torch.linalg.eigvalsh(M)
        if float(ev.abs().min()) <= COND_LIMIT * float(ev.abs().max()) or not bool(torch.isfinite(ev).all()):
            continue
        Q, R = torch.linalg.qr((y - gamma * s).T)  # (n, k), (k, k)
        W = R @ torch.linalg.solve(M, R.T)
        lam, U = torch.linalg.eigh(0.5 * (W + W.T))
        return Q @ U, lam, k
    return S.new_zeros(n, 0), S.new_zeros(0), 0


class SR1(ExtraState):
    """L-SR1 in a trust region (see the module docstring)."""

    needs_loss_closure = True
    loss_scaler = None  # fp16: a gradlab.core.loss_scale.LossScaler (gradlab.optim.loss_scaling.attach)

    def __init__(self, params, lr: float = 1.0, history_size: int = 10, skip_tol: float = 1e-8,
                 eta: float = 1e-4):
        defaults = OPTIONS.resolve(dict(lr=lr, history_size=history_size, skip_tol=skip_tol, eta=eta),
                                   owner="optimizer sr1")
        super().__init__(params, defaults)
        self.radius = float(defaults["lr"])
        self.gamma = 1.0
        self.S: list[Tensor] = []
        self.Y: list[Tensor] = []
        self.counts = {"steps": 0, "accepted": 0, "skipped": 0}

    @property
    def events(self) -> list:
        return []

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def model(self) -> tuple[Tensor, Tensor]:
        """The current model Hessian as ``(P, lam)`` with ``B = gamma I + P diag(lam) P^T``."""
        if not self.S:
            return torch.zeros(0, 0), torch.zeros(0)
        P, lam, _ = compact_eigen(torch.stack(self.S), torch.stack(self.Y), self.gamma)
        return P, lam

    def eigenvalues(self) -> Tensor:
        """The distinct eigenvalues of the model Hessian: ``gamma + lam`` and ``gamma`` (ascending)."""
        _, lam = self.model()
        return torch.sort(torch.cat([lam.double() + self.gamma, torch.tensor([self.gamma], dtype=torch.float64)]))[0]

    @torch.no_grad()
    def step(self, closure=None):
        """One trust-region step; ``closure()`` returns the loss and does not call backward."""
        group = self.param_groups[0]
        params = self._params()
        loss0, g, _ = evaluate(closure, params, "SR1", scaler=self.loss_scaler)
        set_grads(params, g)
        self.counts["steps"] += 1
        dt = work_dtype(params)
        g = g.to(dt)
        if not bool(g.any()) or not bool(torch.isfinite(g).all()):
            return loss0
        if self.S:
            P, lam, _ = compact_eigen(torch.stack(self.S), torch.stack(self.Y), self.gamma)
        else:
            P, lam = g.new_zeros(g.numel(), 0), g.new_zeros(0)
        p, _ = eigen_trust_step(g, self.gamma, P, lam, self.radius)
        Bp = self.gamma * p + P @ (lam * (P.T @ p))
        predicted = -float(g @ p + 0.5 * (p @ Bp))
        backup = [q.detach().clone() for q in params]
        add_to_params(params, p)
        loss1, g1, _ = evaluate(closure, params, "SR1", scaler=self.loss_scaler)
        actual = float(loss0) - float(loss1)
        rho = actual / predicted if predicted > 0 and math.isfinite(actual) else -math.inf
        if rho > group["eta"]:
            self.counts["accepted"] += 1
        else:
            for q, b in zip(params, backup):
                q.copy_(b)
        self._update_pair(p, g1.to(dt) - g, Bp, group)
        step_norm = float(p.norm())
        if rho > 0.75 and step_norm > 0.8 * self.radius:
            self.radius = min(2 * self.radius, MAX_RADIUS)
        elif rho < 0.1:
            self.radius = 0.5 * step_norm if step_norm > 0 else 0.5 * self.radius
        return loss0

    def _update_pair(self, s: Tensor, y: Tensor, Bs: Tensor, group: dict) -> None:
        r = y - Bs
        if not bool(torch.isfinite(y).all()) or float(s @ r) == 0.0 or \
                abs(float(s @ r)) < group["skip_tol"] * float(s.norm()) * float(r.norm()):
            self.counts["skipped"] += 1
            return
        self.S.append(s.clone())
        self.Y.append(y.clone())
        del self.S[:-group["history_size"]], self.Y[:-group["history_size"]]
        sy = float(s @ y)
        if sy > 0:
            self.gamma = float(y @ y) / sy

    def _gradlab_state(self) -> dict:
        return {"radius": self.radius, "gamma": self.gamma, "counts": dict(self.counts),
                "S": [s.clone() for s in self.S], "Y": [y.clone() for y in self.Y]}

    def _load_gradlab_state(self, extra: dict) -> None:
        device = self._params()[0].device
        self.radius, self.gamma = float(extra["radius"]), float(extra["gamma"])
        self.counts = {k: int(v) for k, v in extra["counts"].items()}
        self.S = [s.to(device) for s in extra["S"]]
        self.Y = [y.to(device) for y in extra["Y"]]


OPTIMIZERS.add(
    "sr1", lambda params, *, seed, **o: SR1(params, **o),
    "limited-memory SR1 in a trust region: can model negative curvature (Byrd, Nocedal & Schnabel 1994)",
    options=OPTIONS, paper="Byrd, Nocedal & Schnabel 1994",
)
