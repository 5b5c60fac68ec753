"""``--precision fp32|bf16|fp16`` of a training run.

* ``bf16``/``fp16``: the forward pass and the loss run under ``torch.autocast`` (matrix products
  in the low precision, reductions and the loss in float32, as autocast decides); the weights,
  the optimizer's state and the update stay float32.
* ``fp16`` with a first-order optimizer: the loss is scaled before backward by a
  ``torch.amp.GradScaler`` and the gradients unscaled before any check or update; a step whose
  gradients overflowed is skipped and the scale lowered (not a divergence).
* ``fp16`` with a second-order (closure-stepping) optimizer: the optimizer takes its own
  gradients and curvature products, loss-scaled by a :class:`gradlab.core.loss_scale.LossScaler`
  handed to it here (:mod:`gradlab.optim.loss_scaling`): ``grad(S loss) / S``, Hessian-vector
  products ``d((S g) . v) / S``, Gauss-Newton products ``J^T (S w) / S``, ``S`` halved and the
  pass retried on overflow. A step that overflows even at ``S = 1`` is skipped (the weights it
  started from restored, the gradient checks not run: not a divergence).
* ``bf16`` needs no scaling (float32's range); neither scaler exists there.

Either scaler's state is in the checkpoint (``scaler``, ``loss_scaler``) and restored on resume.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from gradlab.core.autocast import DTYPES
from gradlab.optim.loss_scaling import attach


class Precision:
    """The autocast context and, under fp16, the gradient scaler: ``torch.amp.GradScaler`` for a
    first-order optimizer, a :class:`~gradlab.core.loss_scale.LossScaler` attached to a
    closure-stepping ``optimizer`` (module docstring)."""

    def __init__(self, name: str, device: torch.device, closure_step: bool, optimizer=None):
        self.name, self.device_type = name, device.type
        self.dtype: Optional[torch.dtype] = DTYPES[name]
        fp16 = self.dtype is torch.float16
        self.scaler = torch.amp.GradScaler(device.type) if fp16 and not closure_step else None
        self.loss_scaler = attach(optimizer) if fp16 and closure_step and optimizer is not None else None
        self.skipped = 0  # closure steps skipped on an overflow at loss scale 1

    def autocast(self):
        """The context of a forward pass (a no-op for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward_and_step(self, loss, optimizer, check: Callable[[], None]) -> None:
        """``loss.backward()``, ``check()`` on the true gradients, ``optimizer.step()``."""
        if self.scaler is None:
            loss.backward()
            check()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)
        check()
        self.scaler.step(optimizer)  # skipped when a gradient overflowed; the scale drops
        self.scaler.update()

    @property
    def scaling(self) -> bool:
        """Whether a step's gradients are loss-scaled (fp16 with either scaler)."""
        return self.scaler is not None or self.loss_scaler is not None

    def state_dict(self) -> dict:
        if self.scaler is not None:
            return {"scaler": self.scaler.state_dict()}
        if self.loss_scaler is not None:
            return {"loss_scaler": {**self.loss_scaler.state_dict(), "skipped": self.skipped}}
        return {}

    def load_state_dict(self, ckpt: dict) -> None:
        if self.scaler is not None and isinstance(ckpt.get("scaler"), dict):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.loss_scaler is not None and isinstance(ckpt.get("loss_scaler"), dict):
            self.loss_scaler.load_state_dict(ckpt["loss_scaler"])
            self.skipped = int(ckpt["loss_scaler"].get("skipped", 0))


__all__ = ["DTYPES", "Precision"]
