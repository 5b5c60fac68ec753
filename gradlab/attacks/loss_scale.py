"""Dynamic loss scaling for input gradients under fp16 autocast (``--precision fp16``).

An attack's gradient flows back through the model in float16, whose smallest positive number is
about 6e-8: on a confident model the gradient of the loss with respect to the logits
(``softmax - onehot``, ~1e-8 and below) rounds to zero there, and so does the input gradient,
although the float32 one is not zero. As ``torch.amp.GradScaler`` does for parameter gradients,
:class:`InputGradScaler` multiplies the loss by a power of two ``S`` before the backward pass and
divides the input gradient by ``S`` in float32 (exact: a power of two); a gradient holding inf or
NaN means ``S`` overflowed float16, so ``S`` is halved and the backward pass retried on the same
graph; after ``growth_interval`` backward passes in a row without overflow ``S`` doubles.
bf16 has float32's range and needs none of this.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["InputGradScaler"]


class InputGradScaler:
    """``scaler.grad(loss, x)``: ``d loss / d x`` computed with the loss scaled by :attr:`scale`.

    Args:
        init_scale: the first ``S`` (``GradScaler``'s default, 2**16).
        growth_interval: backward passes without overflow after which ``S`` doubles.
        max_scale: ``S`` never grows past this (float16's range ends at 65504; a larger ``S`` only
            helps losses far below one).
    """

    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 100, max_scale: float = 2.0**24):
        self.scale = float(init_scale)
        self.growth_interval = growth_interval
        self.max_scale = max_scale
        self._good = 0  # backward passes since the last overflow or growth
        self.backoffs = 0  # how often S was halved (for tests and curious users)

    def grad(self, loss: Tensor, x: Tensor, basis: Optional[Tensor] = None) -> Tensor:
        """The gradient of the scalar ``loss`` with respect to ``x`` (float32 in, float32 out).

        With ``basis`` ``(K, *loss.shape)``: ``loss`` is any tensor and the result ``(K, *x.shape)``
        holds the vector-Jacobian products of its ``K`` rows (``is_grads_batched``; DeepFool's
        Jacobian rows), all under one scale."""
        g, s = self._scaled(loss, x, basis, create_graph=False)
        return g.float() / s

    def scaled_grad(self, loss: Tensor, x: Tensor) -> tuple[Tensor, float]:
        """``(S * d loss / d x, S)`` with the graph of the scaled gradient kept (``create_graph``),
        for Hessian-vector products that run in fp16 on scaled values too:
        ``H v = d((S g) . v) / d x / S`` (the curvature attack). ``S`` is the scale used."""
        return self._scaled(loss, x, None, create_graph=True)

    def _scaled(self, loss: Tensor, x: Tensor, basis: Optional[Tensor], create_graph: bool) -> tuple[Tensor, float]:
        while True:
            s = self.scale
            last = s <= 1.0
            keep = create_graph or not last
            if basis is None:
                (g,) = torch.autograd.grad(loss * s, x, retain_graph=keep, create_graph=create_graph)
            else:
                (g,) = torch.autograd.grad(loss, x, grad_outputs=basis * s, retain_graph=keep,
                                           create_graph=create_graph, is_grads_batched=True)
            # fp16 only: one host sync per gradient, to know whether to retry
            if last or bool(torch.isfinite(g).all()):
                break
            self.scale = max(self.scale / 2.0, 1.0)
            self._good = 0
            self.backoffs += 1
        self._good += 1
        if self._good >= self.growth_interval and self.scale < self.max_scale:
            self.scale = min(self.scale * 2.0, self.max_scale)
            self._good = 0
        return g, s
