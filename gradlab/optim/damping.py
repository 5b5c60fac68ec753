"""Levenberg-Marquardt damping adaptation, shared by ``natural-gd``, ``newton`` and ``saddle-free-newton``.

A damped second-order step ``s = lr * d`` (``d`` solving ``(C + lambda I) d = -g`` for a curvature
``C``, or the saddle-free ``|C|`` analogue) is judged by the quadratic model it came from, on the
same batch (Martens 2010, Sec. 4.1; Nocedal & Wright 2006, Sec. 10.3)::

    q(s)   = g^T s + s^T C s / 2                       the predicted change (undamped model)
    rho    = (f(theta + s) - f(theta)) / q(s)           actual change over predicted
    lambda <- 3/2 lambda if rho < 1/4;  2/3 lambda if rho > 3/4

A model that predicts no decrease (``q >= 0``) gets ``rho = -inf``. A step that raises the batch
loss (or makes it NaN) is undone (gradlab's safeguard); ``lambda`` never falls below
:data:`MIN_DAMPING`, so a damping that went to 0 can grow back. ``rho`` costs one forward pass:
the closure evaluated once more without gradients (averaged across ranks under torchrun). The
adapted ``lambda`` lives in the parameter groups (``group["damping"]``), so torch's own
``state_dict`` carries it through checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from gradlab.core.distributed import process_count, reduce_over_ranks

BOOST, DROP = 1.5, 2 / 3  # Martens 2010, Sec. 4.1
LOW, HIGH = 0.25, 0.75  # the rho thresholds
MIN_DAMPING = 1e-8


def predicted_change(g_dot_d: float, dCd: float, lr: float) -> float:
    """``q(lr d) - q(0) = lr g^T d + lr^2 d^T C d / 2`` of the undamped quadratic model."""
    return lr * g_dot_d + 0.5 * lr * lr * dCd


def cg_curvature(d: Tensor, g: Tensor, residual: Tensor, lam: float) -> float:
    """``d^T C d`` from a CG solve of ``(C + lam I) d = -g`` with residual ``r = -g - (C + lam I) d``:
    ``d^T (-g - r) - lam |d|^2``, with no extra product."""
    return float(d.dot(-g - residual)) - lam * float(d.dot(d))


def reduction_ratio(f0: float, f1: float, q: float) -> float:
    """``(f1 - f0) / q``; ``-inf`` when the model predicts no decrease or ``f1`` is not finite."""
    if not q < 0 or not math.isfinite(f1):
        return -math.inf
    return (f1 - f0) / q


def adapted(lam: float, rho: float) -> float:
    """The Levenberg-Marquardt rule (module docstring), floored at :data:`MIN_DAMPING`."""
    new = lam * BOOST if rho < LOW else (lam * DROP if rho > HIGH else lam)
    return max(new, MIN_DAMPING)


def batch_loss(closure: Callable, device) -> float:
    """``closure()`` without gradients, as a float (the mean over ranks under torchrun)."""
    with torch.no_grad():
        f = float(closure())
    if process_count() > 1:
        f = float(reduce_over_ranks([torch.tensor([f], dtype=torch.float64, device=device)], mean=True)[0])
    return f


@dataclass
class Trial:
    """What :func:`trial_step` found: the batch loss after the step, ``rho``, whether it was kept."""

    loss_after: float
    rho: float
    kept: bool


def trial_step(params: Sequence[Tensor], steps: Sequence[Tensor], lr: float, closure: Callable, f0: float,
               q: float) -> Trial:
    """Move ``params`` by ``lr * steps`` (one tensor per parameter), measure the batch loss and
    ``rho`` against the predicted change ``q``, and undo the move when the loss rose or is NaN."""
    params = list(params)
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        torch._foreach_add_(params, [s.to(p.dtype) for s, p in zip(steps, params)], alpha=lr)
    f1 = batch_loss(closure, params[0].device)
    kept = f1 <= f0
    if not kept:
        with torch.no_grad():
            torch._foreach_copy_(params, saved)
    return Trial(f1, reduction_ratio(f0, f1, q), kept)


def adapt_groups(param_groups: list[dict], lam: float, rho: float) -> float:
    """Write the adapted damping into every group; returns it."""
    new = adapted(lam, rho)
    for group in param_groups:
        group["damping"] = new
    return new
