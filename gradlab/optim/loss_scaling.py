"""fp16 loss scaling of the gradients and curvature products that closure-stepping optimizers take.

A ``needs_loss_closure`` optimizer (adahessian, curvature-gd, newton, saddle-free-newton, lbfgs,
sr1, sam, asam, natural-gd, kfac) takes its own ``autograd.grad`` of the closure's loss; under
fp16 autocast that backward pass runs through float16 activations, and on a confident model the
gradient underflows to zero, a Hessian- or Gauss-Newton-vector product (two small factors) first.
The remedy is the attacks' (:class:`gradlab.core.loss_scale.LossScaler`, one mechanism): the
gradient is ``grad(S * loss) / S`` in float32, a Hessian-vector product ``d((S g) . v) / S`` on
the scaled graph, a Gauss-Newton product ``J^T (S Lambda J v) / S``; ``S`` halves and the pass is
retried on inf/NaN and doubles after clean passes.

* :func:`attach` gives an optimizer a scaler (``optimizer.loss_scaler``). ``gradlab train
  --precision fp16`` does it (:class:`gradlab.training.precision.Precision`, which checkpoints the
  scale); in a notebook call ``attach(opt)`` when the closure runs under fp16 autocast. Without a
  scaler (the default: fp32, bf16, or a plain loop) every function here is the plain autograd call.
* :func:`gradients`, :func:`scaled_gradients` and :func:`hvp` are what the optimizers call.
* When even ``S = 1`` overflows, they raise :class:`~gradlab.core.loss_scale.GradientOverflow`:
  the training loop then restores the weights the step started from and skips the step, as the
  first-order fp16 path skips a step whose scaled gradient overflowed (not a divergence). Under
  torchrun the ranks agree on it first (:func:`check`: one more small all-reduce per gradient and
  product); each rank keeps its own scale (a scale decides how a rank's local backward pass is
  computed, not what it computes).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from gradlab.core.distributed import process_count, reduce_over_ranks
from gradlab.core.loss_scale import GradientOverflow, LossScaler
from gradlab.curvature.hvp import hvp_from_grads

__all__ = ["GradientOverflow", "LossScaler", "attach", "gradients", "check", "hvp", "scaled_gradients", "scaler_of"]

#: backward passes without overflow before the scale doubles (several per step: line searches,
#: SAM's second gradient); GradScaler's 2000 steps would take too long to recover from a back-off.
GROWTH_INTERVAL = 200


def attach(optimizer, scaler: Optional[LossScaler] = None) -> LossScaler:
    """Give ``optimizer`` (any closure-stepping one) the loss scaler its gradients go through."""
    scaler = scaler if scaler is not None else LossScaler(growth_interval=GROWTH_INTERVAL)
    optimizer.loss_scaler = scaler
    return scaler


def scaler_of(optimizer) -> Optional[LossScaler]:
    """The optimizer's loss scaler, or None (no scaling)."""
    return getattr(optimizer, "loss_scaler", None)


def check(scaler: LossScaler, what: str, device: torch.device) -> None:
    """Raise when the last pass overflowed at scale 1. Under torchrun every rank reaches the same
    checks in the same order (the optimizers branch on rank-averaged values only), so the flag is
    summed over the ranks (one small all-reduce, fp16 runs only) and all skip the step together:
    a rank raising alone would leave the others waiting in the gradient's all-reduce."""
    overflowed = scaler.overflowed
    if process_count() > 1:
        flag = torch.tensor([float(overflowed)], device=device)
        overflowed = bool(reduce_over_ranks([flag])[0].item() > 0)
    if overflowed:
        raise GradientOverflow(f"the {what} overflowed float16 at loss scale 1")


def _filled(grads, params) -> list[Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def gradients(scaler: Optional[LossScaler], loss: Tensor, params: Sequence[Tensor], *,
              retain_graph: bool = False) -> list[Tensor]:
    """``d loss / d params`` (zeros for unused parameters), without a graph, loss-scaled when
    ``scaler`` is given; ``retain_graph`` keeps the loss's graph for a later backward."""
    params = list(params)
    if scaler is None:
        return _filled(torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True), params)
    grads = scaler.grad(loss, params, allow_unused=True, retain_graph=retain_graph)
    check(scaler, "gradient", loss.device)
    return grads


def scaled_gradients(scaler: Optional[LossScaler], loss: Tensor,
                     params: Sequence[Tensor]) -> tuple[list[Tensor], float]:
    """``(S * d loss / d params, S)`` with the gradients' graph kept for :func:`hvp` (``S = 1``
    without a scaler); the true gradient is ``g.detach() / S``."""
    params = list(params)
    if scaler is None:
        return _filled(torch.autograd.grad(loss, params, create_graph=True, allow_unused=True), params), 1.0
    grads, s = scaler.scaled_grad(loss, params, allow_unused=True)
    check(scaler, "gradient", loss.device)
    return grads, s


def hvp(scaler: Optional[LossScaler], scaled: Sequence[Tensor], s: float, params: Sequence[Tensor],
        vecs: Sequence[Tensor], *, retain_graph: bool = True) -> list[Tensor]:
    """``H v`` from the gradients of :func:`scaled_gradients` (scaled by ``s``), in float32; the
    product retried with ``v`` halved while it overflows (the scaler keeps the graph for that)."""
    if scaler is None:
        return hvp_from_grads(scaled, params, vecs, retain_graph=retain_graph)
    out = scaler.product(lambda c: hvp_from_grads(scaled, params, [v * c for v in vecs] if c != 1.0 else vecs,
                                                  retain_graph=True), s)
    check(scaler, "Hessian-vector product", out[0].device)
    return out
