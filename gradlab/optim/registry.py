"""The optimizer registry and the hyperparameter checks every optimizer shares.

An optimizer is one file that registers one :class:`OptimizerSpec`::

    OPTIMIZERS.add("adahessian", OptimizerSpec(0.15, _make), "AdaHessian (Yao et al. 2021)",
                   options="--lr --hessian-power --hessian-update-every")

``make(params, opts)`` receives the fully resolved options (every key of
:data:`gradlab.optim.OPTIM_DEFAULTS`, ``lr`` already filled in) and picks the ones it uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

from torch.optim import Optimizer

from gradlab.core.errors import GradlabError
from gradlab.core.registry import Registry

OPTIMIZERS = Registry("optimizer")


@dataclass(frozen=True)
class OptimizerSpec:
    """``default_lr``: the learning rate used when the user gives none (``lr: None``)."""

    default_lr: float
    make: Callable[[Iterable, dict], Optimizer]


def _finite(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise GradlabError(f"invalid {name}: {value!r} (must be a number)") from None
    if not math.isfinite(v):
        raise GradlabError(f"invalid {name}: {value} (must be finite)")
    return v


def check_range(name: str, value, low: float, high: float | None = None, *, low_open: bool = False,
                high_open: bool = True) -> float:
    """Return ``value`` as a float, or raise GradlabError naming it and the allowed interval.

    ``check_range("momentum", m, 0, 1)`` accepts ``0 <= m < 1``.
    """
    v = _finite(name, value)
    ok_low = v > low if low_open else v >= low
    ok_high = True if high is None else (v < high if high_open else v <= high)
    if not (ok_low and ok_high):
        lo = f"{'(' if low_open else '['}{low:g}"
        hi = "inf)" if high is None else f"{high:g}{')' if high_open else ']'}"
        raise GradlabError(f"invalid {name}: {value} (must be in {lo}, {hi})")
    return v


def check_int(name: str, value, low: int) -> int:
    """An integer ``>= low`` (``hessian_every``, ``hessian_samples``)."""
    if isinstance(value, bool) or not isinstance(value, int) and not (
        isinstance(value, float) and value.is_integer()
    ):
        raise GradlabError(f"invalid {name}: {value!r} (must be an integer >= {low})")
    if int(value) < low:
        raise GradlabError(f"invalid {name}: {value} (must be an integer >= {low})")
    return int(value)


def check_betas(value) -> tuple[float, float]:
    """Two EMA coefficients, each in [0, 1)."""
    try:
        b1, b2 = value
    except (TypeError, ValueError):
        raise GradlabError(f"invalid betas: {value!r} (must be two numbers in [0, 1))") from None
    return check_range("beta1", b1, 0.0, 1.0), check_range("beta2", b2, 0.0, 1.0)


def fused_kernel_takes(tensors: Iterable, *, one_device_and_dtype: bool = False) -> bool:
    """Whether torch's fused Adam/AdamW kernels take every tensor: real floating point, on a device
    that has them (and, with ``one_device_and_dtype``, all on one device in one dtype, for a direct
    call of the kernel rather than through torch.optim, which groups them itself)."""
    import torch

    try:  # private helpers: a torch (pyproject allows >= 2.1) without them keeps the foreach path
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:
        return False
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    if not tensors or getattr(torch, "_fused_adamw_", None) is None:
        return False
    devices = _get_fused_kernels_supported_devices()
    first = tensors[0]
    return all(t.is_floating_point() and t.device.type in devices
               and (not one_device_and_dtype or (t.dtype == first.dtype and t.device == first.device))
               for t in tensors)
