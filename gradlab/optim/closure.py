"""The closure contract of the Newton-type optimizers (lbfgs, sr1, newton, saddle-free-newton).

``step(closure)``: the closure returns the loss at the current weights WITH its graph and does not
call ``backward`` (the ``needs_loss_closure = True`` convention of :mod:`gradlab.optim`). These
optimizers may evaluate it several times per step (a line search, a trust-region trial point);
the training loop reports the first evaluation.

:func:`evaluate` takes the loss and the gradient with ``torch.autograd.grad`` (optionally keeping
the graph for Hessian-vector products), and under ``torch.distributed`` averages loss and
gradient across ranks (``autograd.grad`` bypasses DDP's reducer; the loop leaves closure-stepping
optimizers' models unwrapped). :class:`GradientGraph` is the Hessian of that loss as a
:class:`~gradlab.curvature.operator.CurvatureOperator` over flat vectors: its products are
:func:`gradlab.curvature.hvp.hvp_from_grads` on the kept graph (averaged across ranks too).

Under ``--precision fp16`` the optimizer holds a loss scaler (:mod:`gradlab.optim.loss_scaling`):
``evaluate(..., scaler=)`` then takes ``grad(S * loss) / S`` and :class:`GradientGraph` divides
each product of the scaled graph by ``S``, so lbfgs', sr1's and Newton's gradients, curvature
pairs and Hessian-vector products do not underflow in float16.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from gradlab.core.distributed import process_count, reduce_over_ranks
from gradlab.core.errors import GradlabError
from gradlab.curvature.operator import CurvatureOperator
from gradlab.optim import loss_scaling
from gradlab.optim.state import ExtraState


def _distributed() -> bool:
    return process_count() > 1


def mean_across_ranks(flat: Tensor) -> Tensor:
    """``flat`` averaged over the ranks (itself on one process)."""
    return reduce_over_ranks([flat], mean=True)[0]


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, offset = [], 0
    for t in like:
        out.append(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def loss_with_graph(closure: Optional[Callable], owner: str) -> Tensor:
    """``closure()`` under grad mode, checked: one :class:`GradlabError` line when the closure is
    missing or returns something without a graph (it called ``backward`` or ``.item()``)."""
    if closure is None:
        raise GradlabError(f"{owner}.step needs a closure that returns the loss without calling backward, "
                           "e.g. opt.step(lambda: loss_fn(model(x), y))")
    with torch.enable_grad():
        loss = closure()
    if not isinstance(loss, Tensor) or not loss.requires_grad:
        raise GradlabError(f"{owner}: the closure must return the loss tensor with its graph "
                           "(do not call backward or .item() inside it)")
    return loss


def evaluate(closure: Optional[Callable], params: Sequence[Tensor], owner: str, *,
             create_graph: bool = False, scaler=None) -> tuple[Tensor, Tensor, list[Tensor]]:
    """``(loss, flat gradient, per-parameter gradients)`` of ``closure()`` at the current weights.

    ``loss`` is detached (a 0-d tensor); the flat gradient is a fresh tensor (float64 never
    forced: the parameters' dtype). With ``create_graph`` the per-parameter gradients keep their
    graph for :class:`GradientGraph`; otherwise they are detached. A missing closure, or one
    that returns something without a graph, raises one :class:`GradlabError` line. With a loss
    ``scaler`` (fp16) the gradient is loss-scaled (the graph case: :func:`evaluate_graph`).
    """
    loss = loss_with_graph(closure, owner)
    with torch.enable_grad():
        if scaler is not None and not create_graph:
            grads = loss_scaling.gradients(scaler, loss, params)
        else:
            grads = torch.autograd.grad(loss, list(params), create_graph=create_graph, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    if not create_graph:
        grads = [g.detach() for g in grads]
    flat = flatten([g.detach() for g in grads])
    return _averaged(loss, flat, grads)


def evaluate_graph(closure: Optional[Callable], params: Sequence[Tensor], owner: str,
                   scaler=None) -> tuple[Tensor, Tensor, "GradientGraph"]:
    """``(loss, flat gradient, Hessian operator)``: :func:`evaluate` with the gradient's graph
    kept as a :class:`GradientGraph`; with a loss ``scaler`` the graph is of ``S * g`` and the
    operator's products are divided by ``S``."""
    params = list(params)
    loss = loss_with_graph(closure, owner)
    with torch.enable_grad():
        grads, s = loss_scaling.scaled_gradients(scaler, loss, params)
    flat = flatten([g.detach() for g in grads])
    if s != 1.0:
        flat = flat / s
    value, flat, _ = _averaged(loss, flat, grads)
    return value, flat, GradientGraph(grads, params, scaler=scaler, scale=s)


def _averaged(loss: Tensor, flat: Tensor, grads: list[Tensor]):
    value = loss.detach()
    if _distributed():
        both = mean_across_ranks(torch.cat([flat, value.reshape(1).to(flat.dtype)]))
        flat, value = both[:-1], both[-1].to(value.dtype)
    return value, flat, grads


def set_grads(params: Sequence[Tensor], flat: Tensor) -> None:
    """``p.grad`` of every parameter from the flat gradient (what the loop's gradient checks read)."""
    for p, g in zip(params, unflatten(flat, params)):
        p.grad = g.clone()


def add_to_params(params: Sequence[Tensor], flat: Tensor, alpha: float = 1.0) -> None:
    """``p += alpha * flat`` block by block, in the parameters' dtype."""
    with torch.no_grad():
        for p, d in zip(params, unflatten(flat, params)):
            p.add_(d.to(p.dtype), alpha=alpha)


class GradientGraph(CurvatureOperator):
    """The Hessian of one closure evaluation, from its gradient graph (``create_graph=True``).

    Products are exact Hessian-vector products (double backward on the kept graph); under
    ``torch.distributed`` each is averaged across ranks, so it is the global batch's Hessian.
    ``to_dense()`` (n products) is the exact Hessian of small problems.
    """

    def __init__(self, grads: Sequence[Tensor], params: Sequence[Tensor], *, scaler=None, scale: float = 1.0):
        params = list(params)
        n = sum(p.numel() for p in params)
        super().__init__(n, params[0].dtype, params[0].device)
        self.grads, self.params = list(grads), params
        self.scaler, self.scale = scaler, scale  # grads are scale * g (fp16 loss scaling)

    def _matmat(self, V: Tensor) -> Tensor:
        cols = []
        for j in range(V.shape[1]):
            hv = loss_scaling.hvp(self.scaler, self.grads, self.scale, self.params,
                                  unflatten(V[:, j], self.params))
            cols.append(mean_across_ranks(flatten(hv)))
        return torch.stack(cols, 1)


class ClosureOptimizer(ExtraState):
    """What the optimizers that take their own gradient (and Hessian products) of a closure share:
    the closure contract flag, the flat list of trainable parameters of all groups, the counters
    ``hvp_count`` (Hessian-vector products so far) and ``steps_taken``, which checkpoints carry,
    and an empty ``events`` list (only SWATS records events). Subclasses: the Newton-type
    optimizers (:mod:`gradlab.optim.newton`) and the Hutchinson-diagonal ones
    (:mod:`gradlab.optim.hessian_diag`)."""

    needs_loss_closure = True
    loss_scaler = None  # fp16: a gradlab.core.loss_scale.LossScaler (gradlab.optim.loss_scaling.attach)

    def __init__(self, params, defaults: dict):
        super().__init__(params, defaults)
        self.hvp_count = 0
        self.steps_taken = 0

    @property
    def events(self) -> list:
        return []

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _gradlab_state(self) -> dict:
        return {"hvp_count": self.hvp_count, "steps_taken": self.steps_taken}

    def _load_gradlab_state(self, extra: dict) -> None:
        self.hvp_count, self.steps_taken = int(extra["hvp_count"]), int(extra["steps_taken"])
