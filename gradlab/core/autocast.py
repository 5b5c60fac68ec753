"""The autocast side of ``--precision`` (:mod:`gradlab.core.precision` declares the option)."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor, nn

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LOW = (torch.bfloat16, torch.float16)


def autocast(precision: str, device_type: str):
    """The context of a forward pass in ``precision`` on ``device_type`` (fp32: a no-op)."""
    dtype = DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def upcast(out: Tensor) -> Tensor:
    """``out`` in float32 when autocast made it bf16/fp16; any other tensor unchanged."""
    return out.float() if isinstance(out, Tensor) and out.dtype in LOW else out


def device_type_of(model: nn.Module) -> str:
    for t in model.parameters():
        return t.device.type
    for t in model.buffers():
        return t.device.type
    return "cpu"


class Autocast(nn.Module):
    """``model`` whose forward pass runs under autocast and returns float32 outputs.

    The parameters are the model's own (nothing is copied or cast); gradients with respect to a
    float32 input come back in float32 (autocast's casts are differentiable).
    """

    def __init__(self, model: nn.Module, precision: str, device_type: Optional[str] = None):
        super().__init__()
        self.inner = model
        self.precision = precision
        self.device_type = device_type or device_type_of(model)

    def forward(self, *args, **kwargs):
        with autocast(self.precision, self.device_type):
            out = self.inner(*args, **kwargs)
        return upcast(out)


def with_precision(model: nn.Module, precision: str) -> nn.Module:
    """``model`` itself for fp32, else an :class:`Autocast` wrapper around it."""
    return model if DTYPES[precision] is None else Autocast(model, precision)


__all__ = ["Autocast", "DTYPES", "autocast", "device_type_of", "upcast", "with_precision"]
