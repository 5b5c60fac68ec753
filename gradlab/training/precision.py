"""``--precision fp32|bf16|fp16`` of a training run.

* ``bf16``/``fp16``: the forward pass and the loss run under ``torch.autocast`` (matrix products
  in the low precision, reductions and the loss in float32, as autocast decides); the weights,
  the optimizer's state and the update stay float32.
* ``fp16`` with a first-order optimizer: the loss is scaled before backward by a
  ``torch.amp.GradScaler`` and the gradients unscaled before any check or update; a step whose
  gradients overflowed is skipped and the scale lowered (not a divergence). Second-order
  optimizers take their own gradients of the (float32) loss, unscaled.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from gradlab.core.autocast import DTYPES


class Precision:
    """The autocast context and, for fp16 first-order training, the gradient scaler."""

    def __init__(self, name: str, device: torch.device, closure_step: bool):
        self.name, self.device_type = name, device.type
        self.dtype: Optional[torch.dtype] = DTYPES[name]
        self.scaler = (torch.amp.GradScaler(device.type)
                       if self.dtype is torch.float16 and not closure_step else None)

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

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, ckpt: dict) -> None:
        if self.scaler is not None and isinstance(ckpt.get("scaler"), dict):
            self.scaler.load_state_dict(ckpt["scaler"])


__all__ = ["DTYPES", "Precision"]
