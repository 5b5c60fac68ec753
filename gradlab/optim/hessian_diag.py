"""Shared machinery of the optimizers that precondition with a Hutchinson Hessian diagonal.

:class:`HessianDiagOptimizer` owns what AdaHessian and curvature-aware GD have in common:

* **The closure contract.** ``step(closure)`` needs a closure that returns the loss *without*
  calling ``backward``. The optimizer itself takes ``grads = autograd.grad(loss, params,
  create_graph=True)``, writes ``p.grad``, estimates ``diag(H)`` with the curvature engine's
  :func:`gradlab.curvature.diagonal.hutchinson_diagonal` (Rademacher probes, products by
  :func:`gradlab.curvature.hvp.hvp_from_grads`; Bekas et al. 2007) and frees the graph.
  The user never calls ``loss.backward(create_graph=True)`` (which also leaves a graph attached to
  ``p.grad``).
* **Delayed Hessian update** (Yao et al. 2021, Sec. 3.4): with ``hessian_every=k`` the diagonal is
  refreshed every k steps; on the other steps a plain gradient (``create_graph=False``) is taken and
  the subclass reuses the last diagonal, so those steps cost one gradient plus an Adam-like update
  (AdaHessian's, on torch's fused kernel: measured 1.02x an SGD step on a 26k-parameter digits
  MLP, against 1.06x for the foreach update; curvature-GD's is a foreach update). The first
  ``hessian_warmup`` steps (default 10, the time scale 1/(1 - beta1) of the gradient EMA) refresh
  every step, then steps ``warmup, warmup + k, ...`` do. Why: at initialisation the diagonal is
  often tiny (a flat region), so the first steps are long; reusing that stale, tiny estimate for
  k - 1 more steps diverged (NaN) for k = 4 on a digits MLP and CNN (batch 64 and 512), while 8 or
  more warm-up refreshes trained as well as k = 1. Set ``hessian_warmup=0`` for the plain rule.
* **Randomness** comes from an optimizer-owned CPU ``torch.Generator`` seeded by ``seed`` (the same
  probes on CPU and GPU); the global RNG is never touched. Its state, the step counter and the
  number of HVPs go into ``state_dict()`` so a resumed run draws the same probes.
* **torch.distributed.** ``autograd.grad`` bypasses DistributedDataParallel's gradient reducer, so
  when ``dist.is_initialized()`` the gradient and the raw Hutchinson estimate ``z * Hz`` are
  averaged across ranks here, in one all-reduce, *before* any absolute value or spatial averaging
  (the average of ``z * H_r z`` over ranks is ``z * H z`` of the global batch when every rank uses
  the same ``seed``, as it must). Compute the loss on the bare module (``ddp.module``) or inside
  ``ddp.no_sync()`` so that DDP does not wait for a backward that never comes.
* ``vecs_fn(params) -> list[Tensor]`` replaces the Rademacher draw (tests use it to fix the probes).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from gradlab.curvature.diagonal import hutchinson_diagonal
from gradlab.curvature.hvp import hvp_from_grads
from gradlab.core.distributed import process_count, reduce_over_ranks
from gradlab.optim import loss_scaling
from gradlab.optim.closure import ClosureOptimizer, loss_with_graph
from gradlab.optim.registry import check_int


class HessianDiagOptimizer(ClosureOptimizer):
    """Base class: subclasses call :meth:`_grad_and_diag` in ``step(closure)``. See module doc."""

    def __init__(self, params, defaults: dict, *, hessian_every: int = 1, hessian_warmup: int = 10,
                 hessian_samples: int = 1, seed: int = 0,
                 vecs_fn: Optional[Callable[[Sequence[Tensor]], Sequence[Tensor]]] = None):
        super().__init__(params, defaults)
        self.hessian_every = check_int("hessian_every", hessian_every, 1)
        self.hessian_warmup = check_int("hessian_warmup", hessian_warmup, 0)
        self.hessian_samples = check_int("hessian_samples", hessian_samples, 1)
        self.seed = check_int("seed", seed, 0)
        self.vecs_fn = vecs_fn
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(self.seed)

    # -- the closure contract -------------------------------------------------------------------

    def _grad_and_diag(self, closure) -> tuple[Tensor, Optional[list[Tensor]]]:
        """Evaluate the closure, set ``p.grad``; return the loss and ``z * Hz`` (None if not refreshed).

        The returned diagonal estimate has one tensor per parameter of :meth:`_params`, raw
        (signed, not spatially averaged), averaged over ``hessian_samples`` probes and over ranks.
        """
        params = self._params()
        t, warm = self.steps_taken, self.hessian_warmup
        refresh = t < warm or (t - warm) % self.hessian_every == 0
        loss = loss_with_graph(closure, type(self).__name__)
        scaler = self.loss_scaler  # fp16: gradients and products loss-scaled (gradlab.optim.loss_scaling)
        with torch.enable_grad():
            # A parameter the loss does not use has zero gradient and zero curvature.
            if refresh:
                grads, s = loss_scaling.scaled_gradients(scaler, loss, params)
                diag = self._hutchinson(grads, params, s)
                grads = [g.detach() / s if s != 1.0 else g.detach() for g in grads]
            else:
                grads, diag = loss_scaling.gradients(scaler, loss, params), None
        if process_count() > 1:  # one all-reduce (mean) of the gradient and the raw estimate
            both = reduce_over_ranks(grads + (diag or []), mean=True)
            grads, diag = both[: len(grads)], (both[len(grads):] if diag is not None else None)
        for p, g in zip(params, grads):
            p.grad = g
        self.steps_taken += 1
        return loss.detach(), diag

    def _hutchinson(self, grads: list[Tensor], params: list[Tensor], scale: float = 1.0) -> list[Tensor]:
        """Mean over ``hessian_samples`` probes z of ``z * (H z)``; frees the graph after the last.
        ``grads`` are ``scale * g`` (fp16 loss scaling); the products are divided by it."""
        if not any(g.requires_grad for g in grads):  # loss linear in every parameter: H = 0
            return [torch.zeros_like(p) for p in params]
        n = self.hessian_samples
        scaler = self.loss_scaler
        if scaler is None:
            def product(z, last):
                return hvp_from_grads(grads, params, z, retain_graph=not last)
        else:
            def product(z, last):
                return loss_scaling.hvp(scaler, grads, scale, params, z)
        diag = hutchinson_diagonal(product, params, n, generator=self._generator, draw=self.vecs_fn)
        self.hvp_count += n
        return diag

    # -- checkpointing --------------------------------------------------------------------------

    def _gradlab_state(self) -> dict:
        return {"rng_state": self._generator.get_state(), **super()._gradlab_state()}

    def _load_gradlab_state(self, extra: dict) -> None:
        self._generator.set_state(extra["rng_state"])
        super()._load_gradlab_state(extra)


def spatial_average(d: Tensor) -> Tensor:
    """``|d|`` averaged over a kernel's spatial dims (AdaHessian, Yao et al. 2021, Sec. 3.3).

    Weights of rank >= 3 are convolution kernels ``(out, in, *spatial)``: Conv1d (3-D), Conv2d
    (4-D), Conv3d (5-D). Each (out, in) kernel gets the mean of ``|d|`` over its spatial entries,
    which smooths the noisy estimate; rank 0-2 tensors (biases, linear weights, norms) keep
    ``|d|`` per entry. Returns a tensor broadcastable to ``d`` (spatial dims of size 1).
    """
    a = d.abs()
    if d.dim() >= 3:
        return a.mean(dim=tuple(range(2, d.dim())), keepdim=True)
    return a
