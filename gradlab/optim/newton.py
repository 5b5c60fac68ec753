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

Damping (``damping_rule``). ``fixed`` keeps ``damping`` as given: the textbook methods, whose
behaviour on the 2-D functions (Newton in one step on a quadratic, at the saddle of ``x^2 - y^2``)
is the point of ``gradlab optimize``. On a network's indefinite, noisy mini-batch Hessian a barely
damped step is no descent step (Newton with 1e-4 raised the digits MLP's loss 68-fold in 40
steps), so ``adaptive`` judges each step by the quadratic model it came from, on the same batch,
with :mod:`gradlab.optim.damping` (shared with ``natural-gd``): ``rho`` = actual / predicted change
of the loss, ``q(lr d) = lr g^T d + lr^2 d^T H d / 2`` with the *undamped* ``H``; ``lambda *= 3/2``
when ``rho < 1/4``, ``*= 2/3`` when ``rho > 3/4``; a step that raises the batch loss is undone.
``d^T H d`` costs no product: the dense path has ``H``, Newton-CG reads it off CG's residual, and
saddle-free Newton from the Ritz values (``Q H Q^T`` is Lanczos' tridiagonal matrix); only a
Newton-CG step that falls back to ``-g`` takes one more product. ``rho`` costs one forward pass.
``auto`` (default) is ``fixed`` on problems solved exactly (at most ``exact_max_params``
parameters for Newton, ``krylov_dim`` for saddle-free Newton: the 2-D functions) and
``adaptive`` above (networks). The adapted value lives in ``param_groups[i]["damping"]``, so
checkpoints carry it.

The solves run in float64 for float64 models and in float32 otherwise (a bf16 model's products are
computed in bf16 and accumulated in float32).
"""

from __future__ import annotations

import torch
from torch import Tensor
from gradlab.core.options import Option, Options
from gradlab.curvature.cg import conjugate_gradient
from gradlab.curvature.lanczos import Lanczos
from gradlab.optim.closure import ClosureOptimizer, GradientGraph, add_to_params, evaluate_graph, set_grads, unflatten
from gradlab.optim.damping import adapt_groups, cg_curvature, predicted_change, trial_step
from gradlab.optim.registry import OPTIMIZERS, lr_option

DAMPING = Option("damping", float, 1e-4, "added to the Hessian's eigenvalues (Levenberg-Marquardt): bounds "
                 "the step along flat directions; the initial value when the damping adapts", low=0)
RULES = ("auto", "adaptive", "fixed")
RULE_HELP = ("adaptive: Levenberg-Marquardt, lambda *= 3/2 when actual / predicted reduction < 1/4, *= 2/3 "
             "when > 3/4, a step raising the batch loss undone (one more forward pass); fixed: as given; "
             "auto: fixed up to {limit} parameters (2-D functions: the textbook step), adaptive above")

NEWTON_OPTIONS = Options(
    lr_option(1.0),
    DAMPING,
    Option("damping_rule", str, "auto", RULE_HELP.format(limit="exact_max_params"), choices=RULES,
           paper="Martens 2010; Nocedal & Wright 2006, Sec. 10.3"),
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
    Option("damping_rule", str, "auto", RULE_HELP.format(limit="krylov_dim"), choices=RULES,
           paper="Martens 2010; Nocedal & Wright 2006, Sec. 10.3"),
    Option("krylov_dim", int, 20, "Lanczos steps: dimension of the Krylov subspace where |H| is inverted",
           low=1, paper="Dauphin et al. 2014"),
)


def work_dtype(params) -> torch.dtype:
    return torch.float64 if params[0].dtype == torch.float64 else torch.float32


class _ClosureNewton(ClosureOptimizer):
    """Shared step: evaluate, solve for a direction and its curvature (subclass), move; with the
    adaptive rule, judge the move by the quadratic model (:mod:`gradlab.optim.damping`). One
    global flat system."""

    def __init__(self, params, defaults: dict):
        super().__init__(params, defaults)
        self.last: dict = {}  # rho, predicted change, damping of the last adaptive step

    def _adaptive(self, n: int, group: dict) -> bool:
        rule = group["damping_rule"]
        return rule == "adaptive" or (rule == "auto" and n > self._auto_limit(group))

    def step(self, closure=None):
        """One step; ``closure()`` returns the loss and does not call backward."""
        params = self._params()
        loss, g, op = evaluate_graph(closure, params, type(self).__name__, self.loss_scaler)
        set_grads(params, g)
        group = self.param_groups[0]
        lr, lam = group["lr"], group["damping"]
        g = g.to(work_dtype(params))
        adaptive = self._adaptive(g.numel(), group)
        d, dHd = self._direction(op, g, group, adaptive)
        self.hvp_count += op.num_matvecs
        del op  # frees the gradient graph before the update
        self.steps_taken += 1
        if not adaptive:
            add_to_params(params, d, alpha=lr)
            return loss
        q = predicted_change(float(g.dot(d)), dHd, lr)
        trial = trial_step(params, unflatten(d, params), lr, closure, float(loss), q)
        adapt_groups(self.param_groups, lam, trial.rho)
        self.last = {"rho": trial.rho, "q": q, "damping": lam, "loss_after": trial.loss_after, "kept": trial.kept}
        return loss

    def _auto_limit(self, group: dict) -> int:  # pragma: no cover
        raise NotImplementedError

    def _direction(self, op: GradientGraph, g: Tensor, group: dict,
                   curvature: bool) -> tuple[Tensor, float]:  # pragma: no cover
        """The direction ``d`` and, when ``curvature``, ``d^T H d`` (the undamped model's curvature
        along it; NaN otherwise)."""
        raise NotImplementedError


class Newton(_ClosureNewton):
    """Damped Newton: dense solve on small problems, Newton-CG otherwise (module docstring)."""

    def __init__(self, params, lr: float = 1.0, damping: float = 1e-4, damping_rule: str = "auto",
                 exact_max_params: int = 200, cg_max_iter: int = 50, cg_tol: float = 1e-8):
        defaults = NEWTON_OPTIONS.resolve(dict(lr=lr, damping=damping, damping_rule=damping_rule,
                                               exact_max_params=exact_max_params, cg_max_iter=cg_max_iter,
                                               cg_tol=cg_tol), owner="optimizer newton")
        super().__init__(params, defaults)

    def _auto_limit(self, group):
        return group["exact_max_params"]

    def _direction(self, op, g, group, curvature):
        lam = group["damping"]
        if op.n <= group["exact_max_params"]:
            eye = torch.eye(op.n, dtype=g.dtype, device=g.device)
            H = op.matmat(eye)
            H = 0.5 * (H + H.T)
            d = torch.linalg.lstsq(H + lam * eye, -g.unsqueeze(1),
                                   driver="gelsd" if g.device.type == "cpu" else None).solution.squeeze(1)
            return d, float(d @ (H @ d))
        res = newton_cg_result(lambda v: op.matvec(v) + lam * v, g, group["cg_max_iter"], group["cg_tol"])
        if res is None:  # steepest descent at once: one more product for the model's curvature
            return -g.clone(), float(g @ op.matvec(g)) if curvature else float("nan")
        return res.x, cg_curvature(res.x, g, res.residual, lam)


def newton_cg_result(matvec, g: Tensor, max_iter: int, rtol: float):
    """CG from 0 on ``A d = -g`` (:mod:`gradlab.curvature.cg` without its progress rule); ``None``
    when its first direction already has non-positive curvature (then :func:`newton_cg` steps
    along ``-g``)."""
    res = conjugate_gradient(matvec, -g, max_iters=max_iter, rtol=rtol, progress_eps=0.0)
    if res.reason == "curvature" and res.iterations == 1:
        return None
    return res


def newton_cg(matvec, g: Tensor, max_iter: int, rtol: float) -> Tensor:
    """Approximate ``-A^{-1} g`` by CG from 0, truncated at non-positive curvature (N&W Alg. 7.1):
    the shared solver of :mod:`gradlab.curvature.cg` without its progress rule; at a first
    direction of non-positive curvature the step is ``-g`` (steepest descent), later the last
    iterate."""
    res = newton_cg_result(matvec, g, max_iter, rtol)
    return -g.clone() if res is None else res.x


class SaddleFreeNewton(_ClosureNewton):
    """``-|H|^{-1} g`` in a Lanczos Krylov subspace (Dauphin et al. 2014; module docstring)."""

    def __init__(self, params, lr: float = 1.0, damping: float = 0.1, damping_rule: str = "auto",
                 krylov_dim: int = 20):
        defaults = SFN_OPTIONS.resolve(dict(lr=lr, damping=damping, damping_rule=damping_rule, krylov_dim=krylov_dim),
                                       owner="optimizer saddle-free-newton")
        super().__init__(params, defaults)

    def _auto_limit(self, group):
        return group["krylov_dim"]

    def _direction(self, op, g, group, curvature):
        if not bool(g.any()):
            return torch.zeros_like(g), 0.0
        k = min(group["krylov_dim"], op.n)
        lz = Lanczos(op, g.to(torch.float64).unsqueeze(0), restart_on_breakdown=False, max_steps=k)
        while lz.steps < k and not lz.exhausted:
            lz.step()
        theta, S = torch.linalg.eigh(lz.tridiagonal()[0])
        Q = lz.basis()[0]  # (m, n) orthonormal rows (zero rows after a breakdown)
        coef = S.T @ (Q @ g.to(torch.float64))
        y = -coef / (theta.abs() + group["damping"])  # d = Q^T S y
        d = Q.T @ (S @ y)
        # d^T H d = y^T S^T (Q H Q^T) S y = sum theta y^2: Q H Q^T is the tridiagonal matrix
        return d.to(g.dtype), float((theta * y * y).sum())


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
