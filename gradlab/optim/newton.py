"""Newton's method and saddle-free Newton, on exact Hessian-vector products of the closure's loss.

Both take the gradient and the Hessian of one closure evaluation (the closure returns the loss
with its graph; :class:`gradlab.optim.closure.GradientGraph` gives exact products) and move
``p <- p + lr * d``:

* ``newton``: ``d = -(H + damping I)^{-1} g``. With at most ``exact_max_params`` parameters (2-D
  functions, tiny models) ``H`` is formed from ``n`` products and the system solved densely
  (least squares where it is singular); otherwise by conjugate gradients on products (Newton-CG,
  Nocedal & Wright 2006, Algorithm 7.1): at most ``cg_max_iter`` iterations, stopping at relative
  residual ``cg_tol``, or at the first direction of non-positive curvature (then the last iterate,
  or ``-g`` if that was the first). Newton is attracted by every critical point: on ``x^2 - y^2``
  it converges to the saddle.
* ``saddle-free-newton`` (Dauphin et al. 2014): ``d = -|H|^{-1} g`` in the Krylov subspace
  ``K_k(H, g)``: ``k = krylov_dim`` Lanczos steps from ``g`` (:class:`gradlab.curvature.lanczos.Lanczos`,
  full reorthogonalisation) give ``H ~ Q T Q^T``; with ``T = S diag(theta) S^T``,
  ``d = -Q S diag(1 / (|theta| + damping)) S^T Q^T g``. Negative curvature is followed downhill
  instead of uphill, so saddles repel. With ``k >= n`` (2-D functions) it is the exact ``|H|``.

The solves run in float64 for float64 models and in float32 otherwise (a bf16 model's products are
computed in bf16 and accumulated in float32).
"""

from __future__ import annotations

import torch
from torch import Tensor
from gradlab.core.options import Option, Options
from gradlab.curvature.cg import conjugate_gradient
from gradlab.curvature.lanczos import Lanczos
from gradlab.optim.closure import GradientGraph, add_to_params, evaluate, set_grads
from gradlab.optim.registry import OPTIMIZERS, lr_option
from gradlab.optim.state import ExtraState

DAMPING = Option("damping", float, 1e-4, "added to the Hessian's eigenvalues (Levenberg-Marquardt): bounds "
                 "the step along flat directions", low=0)

NEWTON_OPTIONS = Options(
    lr_option(1.0),
    DAMPING,
    Option("exact_max_params", int, 200, "form H and solve densely up to this many parameters; "
           "conjugate gradients on Hessian-vector products above", low=0),
    Option("cg_max_iter", int, 50, "conjugate-gradient iterations per step (Newton-CG)", low=1,
           paper="Nocedal & Wright 2006, Alg. 7.1"),
    Option("cg_tol", float, 1e-8, "stop CG at this residual relative to the gradient norm", low=0, low_open=True),
)

SFN_OPTIONS = Options(
    lr_option(1.0),
    # 0.1: 1e-2 and below diverged on the digits MLP (tiny Ritz values of a mini-batch Hessian)
    Option("damping", float, 0.1, DAMPING.help, low=0, paper="Dauphin et al. 2014"),
    Option("krylov_dim", int, 20, "Lanczos steps: dimension of the Krylov subspace where |H| is inverted",
           low=1, paper="Dauphin et al. 2014"),
)


def work_dtype(params) -> torch.dtype:
    return torch.float64 if params[0].dtype == torch.float64 else torch.float32


class _ClosureNewton(ExtraState):
    """Shared step: evaluate, solve for a direction (subclass), move. One global flat system."""

    needs_loss_closure = True

    def __init__(self, params, defaults: dict):
        super().__init__(params, defaults)
        self.hvp_count = 0
        self.steps_taken = 0

    @property
    def events(self) -> list:
        return []

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def step(self, closure=None):
        """One step; ``closure()`` returns the loss and does not call backward."""
        params = self._params()
        loss, g, grads = evaluate(closure, params, type(self).__name__, create_graph=True)
        set_grads(params, g)
        op = GradientGraph(grads, params)
        group = self.param_groups[0]
        d = self._direction(op, g.to(work_dtype(params)), group)
        self.hvp_count += op.num_matvecs
        del op, grads  # frees the gradient graph before the update
        add_to_params(params, d, alpha=group["lr"])
        self.steps_taken += 1
        return loss

    def _direction(self, op: GradientGraph, g: Tensor, group: dict) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _gradlab_state(self) -> dict:
        return {"hvp_count": self.hvp_count, "steps_taken": self.steps_taken}

    def _load_gradlab_state(self, extra: dict) -> None:
        self.hvp_count, self.steps_taken = int(extra["hvp_count"]), int(extra["steps_taken"])


class Newton(_ClosureNewton):
    """Damped Newton: dense solve on small problems, Newton-CG otherwise (module docstring)."""

    def __init__(self, params, lr: float = 1.0, damping: float = 1e-4, exact_max_params: int = 200,
                 cg_max_iter: int = 50, cg_tol: float = 1e-8):
        defaults = NEWTON_OPTIONS.resolve(dict(lr=lr, damping=damping, exact_max_params=exact_max_params,
                                               cg_max_iter=cg_max_iter, cg_tol=cg_tol), owner="optimizer newton")
        super().__init__(params, defaults)

    def _direction(self, op, g, group):
        lam = group["damping"]
        if op.n <= group["exact_max_params"]:
            eye = torch.eye(op.n, dtype=g.dtype, device=g.device)
            H = op.matmat(eye)
            A = 0.5 * (H + H.T) + lam * eye
            d = torch.linalg.lstsq(A, -g.unsqueeze(1), driver="gelsd" if g.device.type == "cpu" else None).solution
            return d.squeeze(1)
        return newton_cg(lambda v: op.matvec(v) + lam * v, g, group["cg_max_iter"], group["cg_tol"])


def newton_cg(matvec, g: Tensor, max_iter: int, rtol: float) -> Tensor:
    """Approximate ``-A^{-1} g`` by CG from 0, truncated at non-positive curvature (N&W Alg. 7.1):
    the shared solver of :mod:`gradlab.curvature.cg` without its progress rule; at a first
    direction of non-positive curvature the step is ``-g`` (steepest descent), later the last
    iterate."""
    res = conjugate_gradient(matvec, -g, max_iters=max_iter, rtol=rtol, progress_eps=0.0)
    if res.reason == "curvature" and res.iterations == 1:
        return -g.clone()
    return res.x


class SaddleFreeNewton(_ClosureNewton):
    """``-|H|^{-1} g`` in a Lanczos Krylov subspace (Dauphin et al. 2014; module docstring)."""

    def __init__(self, params, lr: float = 1.0, damping: float = 0.1, krylov_dim: int = 20):
        defaults = SFN_OPTIONS.resolve(dict(lr=lr, damping=damping, krylov_dim=krylov_dim),
                                       owner="optimizer saddle-free-newton")
        super().__init__(params, defaults)

    def _direction(self, op, g, group):
        if not bool(g.any()):
            return torch.zeros_like(g)
        k = min(group["krylov_dim"], op.n)
        lz = Lanczos(op, g.to(torch.float64).unsqueeze(0), restart_on_breakdown=False, max_steps=k)
        while lz.steps < k and not lz.exhausted:
            lz.step()
        theta, S = torch.linalg.eigh(lz.tridiagonal()[0])
        Q = lz.basis()[0]  # (m, n) orthonormal rows (zero rows after a breakdown)
        coef = S.T @ (Q @ g.to(torch.float64))
        d = -(Q.T @ (S @ (coef / (theta.abs() + group["damping"]))))
        return d.to(g.dtype)


OPTIMIZERS.add(
    "newton", lambda params, *, seed, **o: Newton(params, **o),
    "damped Newton: dense Hessian solve on small problems, Newton-CG on Hessian-vector products otherwise",
    options=NEWTON_OPTIONS, paper="Nocedal & Wright 2006",
)
OPTIMIZERS.add(
    "saddle-free-newton", lambda params, *, seed, **o: SaddleFreeNewton(params, **o),
    "saddle-free Newton: |H|^-1 g in a Lanczos Krylov subspace (Dauphin et al. 2014)",
    options=SFN_OPTIONS, paper="Dauphin et al. 2014",
)
