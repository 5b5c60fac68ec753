"""Dynamic loss scaling for the gradients and curvature products taken under fp16 autocast.

A backward pass through a model that ran under ``torch.autocast(dtype=float16)`` carries float16
intermediate values, whose smallest positive number is about 6e-8: on a confident model the
gradient of the loss with respect to the logits (``softmax - onehot``, ~1e-8 and below) rounds to
zero there, and so does every gradient behind it, although the float32 one is not zero. A
Hessian- or Gauss-Newton-vector product (second derivatives: products of two small numbers)
underflows first. As ``torch.amp.GradScaler`` does for ``loss.backward()``, :class:`LossScaler`
multiplies the loss by a power of two ``S`` before the backward pass and divides the result by
``S`` in float32 (exact: a power of two). One mechanism serves the attacks' input gradients
(:mod:`gradlab.attacks.loss_scale`) and the second-order optimizers' parameter gradients and
curvature products (:mod:`gradlab.optim.loss_scaling`):

* :meth:`LossScaler.grad`: ``d loss / d x`` for one tensor or a list of tensors;
* :meth:`LossScaler.scaled_grad`: ``(S * g, S)`` with the graph kept, so that a Hessian-vector
  product runs on scaled values too, ``H v = d((S g) . v) / dx / S``;
* :meth:`LossScaler.product`: any product linear in its ``grad_outputs`` scale ``c`` (a
  Hessian-vector product on ``S g``, ``J^T (S w)``), retried with ``c`` halved on overflow.

A result holding inf or NaN means ``S`` overflowed float16: ``S`` is halved and the backward pass
retried on the same graph (kept for that); after ``growth_interval`` backward passes in a row
without overflow ``S`` doubles, up to ``max_scale``. When even ``S = 1`` overflows (a product:
even ``2**-24``, since its vector may be large), the result is returned as it is and
:attr:`LossScaler.overflowed` is set (an optimizer then skips its step:
:class:`GradientOverflow`). bf16 has float32's range and needs none of this. The scale's state
travels through :meth:`LossScaler.state_dict` (a training run's checkpoint holds it).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["GradientOverflow", "LossScaler", "all_finite"]

Tensors = Union[Tensor, Sequence[Tensor]]


#: the smallest ``s * c`` a product backs off to (float16's subnormals end at 2**-24)
MIN_PRODUCT_SCALE = 2.0**-24


class GradientOverflow(ArithmeticError):
    """A gradient or curvature product overflowed float16 at loss scale 1: the step is skipped."""


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every entry of every tensor is finite (one host sync)."""
    flags = [torch.isfinite(t).all() for t in tensors if t is not None]
    return bool(torch.stack(flags).all()) if flags else True


class LossScaler:
    """A power-of-two loss scale ``S`` that backs off on overflow and grows after clean passes.

    Args:
        init_scale: the first ``S`` (``GradScaler``'s default, 2**16).
        growth_interval: backward passes without overflow after which ``S`` doubles.
        max_scale: ``S`` never grows past this (float16's range ends at 65504; a larger ``S`` only
            helps losses far below one).
    """

    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 100, max_scale: float = 2.0**24):
        self.scale = float(init_scale)
        self.growth_interval = int(growth_interval)
        self.max_scale = float(max_scale)
        self._good = 0  # backward passes since the last overflow or growth
        self.backoffs = 0  # how often S was halved (for tests, logs and curious users)
        self.overflowed = False  # the last pass overflowed even at S = 1

    # -- gradients ------------------------------------------------------------------------------
    def grad(self, loss: Tensor, x: Tensors, basis: Optional[Tensor] = None, *,
             allow_unused: bool = False, retain_graph: bool = False) -> Tensors:
        """The gradient of the scalar ``loss`` with respect to ``x`` (one tensor, or a list: then a
        list, zeros for unused inputs when ``allow_unused``), in float32 (or ``x``'s dtype).

        With ``basis`` ``(K, *loss.shape)`` (one tensor ``x`` only): ``loss`` is any tensor and
        the result ``(K, *x.shape)`` holds the vector-Jacobian products of its ``K`` rows
        (``is_grads_batched``; DeepFool's Jacobian rows), all under one scale. ``retain_graph``
        keeps the loss's graph for a later backward pass."""
        g, s = self._scaled(loss, x, basis, create_graph=False, allow_unused=allow_unused, retain=retain_graph)
        if isinstance(g, Tensor):
            return _unscaled(g, s)
        return [_unscaled(t, s) for t in g]

    def scaled_grad(self, loss: Tensor, x: Tensors, *, allow_unused: bool = False) -> tuple[Tensors, float]:
        """``(S * d loss / d x, S)`` with the graph of the scaled gradient kept (``create_graph``),
        for Hessian-vector products on scaled values (:meth:`product`). ``S`` is the scale used."""
        return self._scaled(loss, x, None, create_graph=True, allow_unused=allow_unused)

    def _scaled(self, loss, x, basis, create_graph: bool, allow_unused: bool, retain: bool = False):
        single = isinstance(x, Tensor)
        inputs = [x] if single else list(x)
        while True:
            s = self.scale
            last = s <= 1.0
            keep = create_graph or retain or not last
            if basis is None:
                g = torch.autograd.grad(loss * s, inputs, retain_graph=keep, create_graph=create_graph,
                                        allow_unused=allow_unused)
            else:
                g = torch.autograd.grad(loss, inputs, grad_outputs=basis * s, retain_graph=keep,
                                        create_graph=create_graph, is_grads_batched=True)
            g = [torch.zeros_like(t) if h is None else h for h, t in zip(g, inputs)]
            # one host sync per gradient, to know whether to retry
            finite = all_finite(g)
            if finite or last:
                break
            self._back_off()
        self.overflowed = not finite
        self._count_clean()
        return (g[0] if single else g), s

    # -- products on a scaled graph -------------------------------------------------------------
    def product(self, fn: Callable[[float], Sequence[Tensor]], s: float) -> list[Tensor]:
        """``fn(c) / (s * c)``, where ``fn(c)`` is a product computed with its ``grad_outputs``
        multiplied by ``c`` on a graph scaled by ``s`` (linear in ``s * c``: ``hvp(S g, c v)``,
        ``J^T (c S w)``). Starts at ``c = 1``; on overflow ``c`` halves (and :attr:`scale` drops
        to ``s * c``, at least 1, for the next gradients) until the product is finite or ``s * c``
        reaches :data:`MIN_PRODUCT_SCALE`: below 1 too, since a product's vector ``v`` (a CG
        direction) may be large where the gradient is not. ``fn`` must keep its graph
        (``retain_graph``) while a retry may follow."""
        c = 1.0
        while True:
            out = list(fn(c))
            finite = all_finite(out)
            if finite or s * c <= MIN_PRODUCT_SCALE:
                break
            c /= 2.0
            self.backoffs += 1
            self._good = 0
            self.scale = min(self.scale, max(s * c, 1.0))
        self.overflowed = not finite
        return [_unscaled(t, s * c) for t in out]

    # -- the schedule ---------------------------------------------------------------------------
    def _back_off(self) -> None:
        self.scale = max(self.scale / 2.0, 1.0)
        self._good = 0
        self.backoffs += 1

    def _count_clean(self) -> None:
        self._good += 1
        if self._good >= self.growth_interval and self.scale < self.max_scale:
            self.scale = min(self.scale * 2.0, self.max_scale)
            self._good = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_interval": self.growth_interval, "max_scale": self.max_scale,
                "good": self._good, "backoffs": self.backoffs}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.growth_interval = int(state.get("growth_interval", self.growth_interval))
        self.max_scale = float(state.get("max_scale", self.max_scale))
        self._good = int(state.get("good", 0))
        self.backoffs = int(state.get("backoffs", 0))
        self.overflowed = False


def _unscaled(t: Tensor, s: float) -> Tensor:
    """``t / s`` in float32 at least (a float16 input gradient is upcast before the division)."""
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t / s
