"""AdaHessian: Adam with the squared gradient replaced by a Hessian-diagonal estimate.

Yao, Gholami, Shen, Mustafa, Keutzer, Mahoney, "ADAHESSIAN: An Adaptive Second Order Optimizer for
Machine Learning", AAAI 2021. Per parameter tensor, at step t (1-based)::

    D_t = spatial_average(|z * H z|)            # Hutchinson, z Rademacher; conv kernels averaged
    m_t = b1 m_{t-1} + (1 - b1) g_t
    v_t = b2 v_{t-1} + (1 - b2) D_t^2
    p  <- p - lr * ( (m_t / (1 - b1^t)) / ((sqrt(v_t / (1 - b2^t)))^k + eps) + wd * p )

with ``k = hessian_power`` (1 in the paper; torch-optimizer defaults to 0.5) and decoupled weight
decay. With ``hessian_every = k`` (the paper's delayed update) ``D`` is refreshed every k steps
(after ``hessian_warmup`` steps refreshed every step) and the last one is reused in between, so
``v`` still moves every step.

Usage in a plain loop (the closure returns the loss, it does not call backward)::

    >>> import torch
    >>> from gradlab.optim.adahessian import AdaHessian
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Linear(4, 3)
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> opt = AdaHessian(model.parameters(), lr=0.05)
    >>> losses = []
    >>> for _ in range(20):
    ...     opt.zero_grad()
    ...     loss = opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
    ...     losses.append(loss.item())
    >>> losses[-1] < losses[0]
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradlab.core.options import Option, Options
from gradlab.optim.hessian_diag import HessianDiagOptimizer, spatial_average
from gradlab.optim.registry import (HESSIAN_DIAG_OPTIONS, OPTIMIZERS, betas_option, eps_option, lr_option,
                                    weight_decay_option)

# The update's hyperparameters; the refresh schedule (hessian_update_every, hessian_warmup,
# hessian_samples) is shared with curvature-GD.
UPDATE_OPTIONS = Options(
    lr_option(0.15),
    betas_option("the squared Hessian diagonal"),
    eps_option(1e-4, "Yao et al. 2021"),
    weight_decay_option(decoupled=True),
    Option("hessian_power", float, 1.0, "exponent k of the denominator sqrt(v)^k (1: the paper's; "
           "torch-optimizer defaults to 0.5)", low=0, high=1, paper="Yao et al. 2021"),
)
OPTIONS = UPDATE_OPTIONS + HESSIAN_DIAG_OPTIONS


class AdaHessian(HessianDiagOptimizer):
    """AdaHessian (see module docstring).

    Args:
        params: parameters or parameter groups.
        lr: learning rate (paper default 0.15).
        betas: EMA coefficients of the gradient and of the squared Hessian diagonal.
        eps: added to the denominator (paper 1e-4).
        weight_decay: decoupled weight decay, multiplied by ``lr``.
        hessian_power: exponent k of the denominator, in [0, 1].
        hessian_every: refresh the diagonal every k steps (delayed update); >= 1.
        hessian_warmup: refresh every step for this many first steps before delaying (see
            :mod:`gradlab.optim.hessian_diag`); >= 0.
        hessian_samples: Rademacher probes per refresh; >= 1.
        seed: seed of the optimizer's own generator for the probes.
        vecs_fn: optional ``params -> probes`` replacing the Rademacher draw (tests).
    """

    def __init__(self, params, lr: float = 0.15, betas=(0.9, 0.999), eps: float = 1e-4,
                 weight_decay: float = 0.0, hessian_power: float = 1.0, hessian_every: int = 1,
                 hessian_warmup: int = 10,
                 hessian_samples: int = 1, seed: int = 0, vecs_fn=None):
        defaults = UPDATE_OPTIONS.resolve(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                               hessian_power=hessian_power), owner="optimizer adahessian")
        super().__init__(params, defaults, hessian_every=hessian_every, hessian_warmup=hessian_warmup,
                         hessian_samples=hessian_samples,
                         seed=seed, vecs_fn=vecs_fn)

    @torch.no_grad()
    def step(self, closure=None):
        """One AdaHessian step; ``closure()`` must return the loss without calling backward."""
        loss, diag = self._grad_and_diag(closure)
        fresh = {}
        if diag is not None:
            # |D| and D^2 for all tensors in two foreach passes; conv kernels then averaged per tap
            mags = torch._foreach_abs(diag)
            squares = torch._foreach_mul(mags, mags)
            for p, a, sq in zip(self._params(), mags, squares):
                if a.dim() >= 3:
                    a = spatial_average(a)
                    sq = _full_square(a, p)
                fresh[id(p)] = (a, sq)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params, fresh)
        return loss

    def _update(self, group: dict, params: list, fresh: dict) -> None:
        b1, b2 = group["betas"]
        lr, k, wd, eps = group["lr"], group["hessian_power"], group["weight_decay"], group["eps"]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_hessian_diag_sq"] = torch.zeros_like(p)
            if id(p) in fresh:
                state["hessian_diag"], state["hessian_diag_sq"] = fresh[id(p)]
            elif "hessian_diag_sq" not in state:  # a state saved before this entry existed
                state["hessian_diag_sq"] = _full_square(state["hessian_diag"], p)
            state["step"] += 1
        states = [self.state[p] for p in params]
        m = [s["exp_avg"] for s in states]
        v = [s["exp_hessian_diag_sq"] for s in states]
        d2 = [s["hessian_diag_sq"] for s in states]
        steps = [s["step"] for s in states]
        # Whole-group foreach kernels (as torch.optim's Adam uses them), folded into as few passes
        # over memory as the update allows, since the update runs right after the backward pass
        # with the caches cold. Per step (bc_i = 1 - b_i^t):
        #   m <- m + (1 - b1)(g - m);  v <- v + (1 - b2)(D^2 - v)
        #   p <- p - lr/bc1 * m / ((v/bc2)^(k/2) + eps)
        #      = p - (lr bc2^(k/2)/bc1) * m / (v^(k/2) + eps bc2^(k/2))
        torch._foreach_lerp_(m, [p.grad for p in params], 1 - b1)
        torch._foreach_lerp_(v, d2, 1 - b2)
        denom = torch._foreach_sqrt(v) if k == 1.0 else torch._foreach_pow(v, k / 2)
        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        if all(t == steps[0] for t in steps):  # the usual case: one scalar for the whole group
            c2 = (1 - b2 ** steps[0]) ** (k / 2)
            torch._foreach_add_(denom, eps * c2)
            torch._foreach_addcdiv_(params, m, denom, value=-lr * c2 / (1 - b1 ** steps[0]))
        else:
            c2 = [(1 - b2 ** t) ** (k / 2) for t in steps]
            torch._foreach_add_(denom, [eps * c for c in c2])
            torch._foreach_addcdiv_(params, m, denom, [-lr * c / (1 - b1 ** t) for c, t in zip(c2, steps)])


def _full_square(d: Tensor, p: Tensor) -> Tensor:
    """``d * d`` at ``p``'s shape (a conv kernel's averaged ``d`` is broadcast over its taps), stored
    whole so that every step's foreach kernels see tensors of equal shapes."""
    return (d * d).expand_as(p).contiguous()


def _make(params, *, seed: int, hessian_update_every: int, **options) -> AdaHessian:
    return AdaHessian(params, hessian_every=hessian_update_every, seed=seed, **options)


OPTIMIZERS.add(
    "adahessian", _make, "AdaHessian: Adam with a Hutchinson Hessian diagonal (Yao et al. 2021)",
    options=OPTIONS, paper="Yao et al. 2021",
)
