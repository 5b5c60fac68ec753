"""L-BFGS: ``torch.optim.LBFGS`` (Nocedal 1980; Liu & Nocedal 1989) through gradlab's closure contract.

torch's L-BFGS calls a closure that runs ``backward`` itself; gradlab's second-order optimizers
get a closure that returns the loss WITH its graph and take the gradient themselves
(:mod:`gradlab.optim.closure`). :class:`LBFGS` wraps the one into the other: each evaluation runs
the closure, takes ``autograd.grad`` (averaged across ranks under torchrun), writes ``p.grad`` and
hands torch the detached loss. The returned loss is the first evaluation's (at the weights the
step started from), as the training loop reports it.

One ``step`` is ``max_iter`` L-BFGS iterations (default 1, so a step of ``gradlab optimize`` or
``gradlab train`` is one iteration, comparable with scipy's ``nit``), each with a strong-Wolfe
line search (Nocedal & Wright, Algorithm 3.5/3.6, c1 = 1e-4, c2 = 0.9; at most 25 evaluations per
iteration) unless ``line_search`` is off (then a fixed step ``lr``). The memory persists across
steps; with mini-batches its curvature pairs mix batches (use full or large batches).

``exact_line_search`` replaces torch's iteration by gradlab's (:mod:`gradlab.optim.lbfgs_exact`):
the same two-loop direction, and a step that minimises along it to ``|phi'(t)| <= exact_tol
|phi'(0)|`` by secant iterations on the directional derivative (exact in one secant step on a
quadratic), so that the finite-termination bound of exact searches holds: at most ``n``
iterations on an ``n``-dimensional strictly convex quadratic with ``history_size >= n``. Its
memory lives in the optimizer state (``exact_S``, ``exact_Y``), so checkpoints carry it.
"""

from __future__ import annotations

import torch

from gradlab.core.options import Option, Options
from gradlab.optim.closure import add_to_params, evaluate, set_grads
from gradlab.optim.lbfgs_exact import CURVATURE_EPS, exact_search, two_loop
from gradlab.optim.registry import OPTIMIZERS, lr_option

#: line-search evaluations allowed per iteration (torch's ``_strong_wolfe`` default ``max_ls``).
EVALS_PER_ITER = 25

OPTIONS = Options(
    lr_option(1.0),
    Option("history_size", int, 20, "curvature pairs (s, y) kept in the L-BFGS memory", low=1,
           paper="Liu & Nocedal 1989"),
    Option("max_iter", int, 1, "L-BFGS iterations per optimizer step", low=1),
    Option("line_search", bool, True, "strong-Wolfe line search (off: a fixed step lr along the direction)",
           paper="Nocedal & Wright 2006, Alg. 3.5"),
    Option("exact_line_search", bool, False, "minimise along each direction by secant steps on the "
           "directional derivative (exact on a quadratic) instead of strong-Wolfe",
           paper="Nocedal & Wright 2006, Thm 6.4"),
    Option("exact_tol", float, 1e-10, "exact search: stop at |phi'(t)| <= this * |phi'(0)|", low=0, low_open=True),
    Option("tolerance_grad", float, 1e-10, "no step once the gradient's largest entry is at most this", low=0),
    Option("tolerance_change", float, 1e-20, "stop a step's iterations once the loss or the step changes less "
           "than this", low=0),
)


class LBFGS(torch.optim.LBFGS):
    """``torch.optim.LBFGS`` stepping with a closure that does not call backward (module docstring)."""

    needs_loss_closure = True
    loss_scaler = None  # fp16: a gradlab.core.loss_scale.LossScaler (gradlab.optim.loss_scaling.attach)

    def __init__(self, params, lr: float = 1.0, history_size: int = 20, max_iter: int = 1,
                 line_search: bool = True, exact_line_search: bool = False, exact_tol: float = 1e-10,
                 tolerance_grad: float = 1e-10, tolerance_change: float = 1e-20):
        o = OPTIONS.resolve(dict(lr=lr, history_size=history_size, max_iter=max_iter, line_search=line_search,
                                 exact_line_search=exact_line_search, exact_tol=exact_tol,
                                 tolerance_grad=tolerance_grad, tolerance_change=tolerance_change),
                            owner="optimizer lbfgs")
        self.exact = o["exact_line_search"]
        self.exact_tol = o["exact_tol"]
        super().__init__(params, lr=o["lr"], max_iter=o["max_iter"], max_eval=o["max_iter"] * (EVALS_PER_ITER + 1),
                         tolerance_grad=o["tolerance_grad"], tolerance_change=o["tolerance_change"],
                         history_size=o["history_size"], line_search_fn="strong_wolfe" if o["line_search"] else None)

    @property
    def events(self) -> list:
        return []

    def step(self, closure=None):
        """One step (``max_iter`` iterations); ``closure()`` returns the loss and does not call backward."""
        params = [p for p in self._params if p.requires_grad]

        def backward_closure():
            loss, flat, _ = evaluate(closure, params, "LBFGS", scaler=self.loss_scaler)
            set_grads(params, flat)
            return loss

        if closure is None:
            evaluate(None, params, "LBFGS")  # one line naming the contract
        if self.exact:
            return self._exact_step(closure, params)
        return super().step(backward_closure)

    @torch.no_grad()
    def _exact_step(self, closure, params):
        """``max_iter`` iterations with the exact line search (module docstring)."""
        group = self.param_groups[0]
        state = self.state[params[0]]
        S, Y = state.setdefault("exact_S", []), state.setdefault("exact_Y", [])
        first, g, _ = evaluate(closure, params, "LBFGS", scaler=self.loss_scaler)
        set_grads(params, g)
        for _ in range(group["max_iter"]):
            if float(g.abs().max()) <= group["tolerance_grad"]:
                break
            d = two_loop(g, S, Y)
            dphi0 = float(g.dot(d))
            if not dphi0 < 0:  # not a descent direction (a stale memory): restart from -g
                S.clear(), Y.clear()
                d, dphi0 = -g, -float(g.dot(g))
            lr = group["lr"]
            t1 = min(1.0, 1.0 / float(g.abs().sum())) * lr if not S else lr
            x0 = [p.detach().clone() for p in params]
            grads = {}

            def move(t: float) -> None:  # x0 + t d, from x0 each time (no drift over trials)
                for p, p0 in zip(params, x0):
                    p.copy_(p0)
                add_to_params(params, d, alpha=t)

            def dphi(t: float) -> float:
                move(t)
                _, gt, _ = evaluate(closure, params, "LBFGS", scaler=self.loss_scaler)
                grads[t] = gt
                return float(gt.dot(d))

            t, _ = exact_search(dphi, dphi0, t1, self.exact_tol)
            move(t)
            if t == 0.0:
                break
            g_new = grads[t]
            s, y = t * d, g_new - g
            if float(y.dot(s)) > CURVATURE_EPS:
                S.append(s)
                Y.append(y)
                del S[:-group["history_size"]], Y[:-group["history_size"]]
            g = g_new
            set_grads(params, g)
            state["n_iter"] = state.get("n_iter", 0) + 1
        return first


OPTIMIZERS.add(
    "lbfgs", lambda params, *, seed, **o: LBFGS(params, **o),
    "L-BFGS with a strong-Wolfe line search (torch.optim.LBFGS; Liu & Nocedal 1989)",
    options=OPTIONS, paper="Liu & Nocedal 1989",
)
