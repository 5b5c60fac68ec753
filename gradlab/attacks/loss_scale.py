"""Dynamic loss scaling for input gradients under fp16 autocast (``--precision fp16``).

An attack's gradient flows back through the model in float16, whose smallest positive number is
about 6e-8: on a confident model the input gradient underflows to zero although the float32 one
is not zero. The mechanism is :class:`gradlab.core.loss_scale.LossScaler`, shared with the
second-order optimizers (:mod:`gradlab.optim.loss_scaling`); :class:`InputGradScaler` is its name
here: ``scaler.grad(loss, x)`` and ``scaler.scaled_grad(loss, x)`` for the attacks' gradients,
Jacobian rows and Hessian-vector products. bf16 has float32's range and needs none of this.
"""

from __future__ import annotations

from gradlab.core.loss_scale import LossScaler as InputGradScaler

__all__ = ["InputGradScaler"]
