"""Euclidean projections onto the norm balls of the minimum-norm attacks, row by row.

``project_ball(delta, eps, norm)`` is the point of ``{d : ||d||_norm <= eps}`` nearest to each
row of ``delta`` in l2 (``delta`` is ``(B, ...)``; ``eps`` a number or ``(B,)``):

* linf: clamp each coordinate to ``[-eps, eps]``;
* l2: rescale rows longer than ``eps``;
* l1: soft thresholding ``sign(v) max(|v| - theta, 0)`` with the threshold ``theta`` from the
  sorted magnitudes (Duchi, Shalev-Shwartz, Singer & Chandra 2008, Figure 1, applied to
  ``|v|``), rows already inside unchanged;
* l0: keep the ``floor(eps)`` entries of largest magnitude and zero the rest (ties broken by
  position: exactly ``floor(eps)`` entries survive).

The attacks clamp ``x + d`` to [0, 1] afterwards; that only moves coordinates of ``d`` towards 0
(``x`` itself lies in the box), so every one of these norms can only shrink.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor


def _rows(eps: Union[float, Tensor], like: Tensor) -> Tensor:
    """``eps`` as a ``(B, 1)`` tensor of ``like``'s dtype and device."""
    e = torch.as_tensor(eps, dtype=like.dtype, device=like.device)
    return e.expand(like.shape[0]).reshape(-1, 1) if e.dim() == 0 else e.reshape(-1, 1).to(like.dtype)


def project_l1(v: Tensor, eps: Union[float, Tensor]) -> Tensor:
    """Rows of ``v`` ``(B, D)`` projected onto the l1 ball of radius ``eps`` (see the module docstring)."""
    e = _rows(eps, v)
    a = v.abs()
    u = a.sort(dim=1, descending=True).values
    css = u.cumsum(dim=1) - e
    j = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=v.dtype)
    positive = u - css / j > 0  # true for a leading run of entries (the support of the projection)
    rho = positive.sum(dim=1, keepdim=True).clamp_min(1)
    theta = (css.gather(1, rho - 1) / rho.to(v.dtype)).clamp_min(0)
    inside = a.sum(dim=1, keepdim=True) <= e
    return torch.where(inside, v, v.sign() * (a - theta).clamp_min(0))


def project_l0(v: Tensor, eps: Union[float, Tensor]) -> Tensor:
    """Rows of ``v`` ``(B, D)`` with all but their ``floor(eps)`` largest-magnitude entries zeroed."""
    k = _rows(eps, v).floor().long().clamp(0, v.shape[1])  # (B, 1)
    order = v.abs().argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(v.shape[1], device=v.device).expand_as(order))
    return v * (rank < k)


def project_ball(delta: Tensor, eps: Union[float, Tensor], norm: str) -> Tensor:
    """Nearest point (l2) of the ``norm`` ball of radius ``eps`` to each row of ``delta`` ``(B, ...)``."""
    flat = delta.reshape(delta.shape[0], -1)
    e = _rows(eps, flat)
    if norm == "linf":
        out = torch.maximum(torch.minimum(flat, e), -e)
    elif norm == "l2":
        n = flat.norm(dim=1, keepdim=True)
        out = flat * torch.where(n > e, e / n.clamp_min(1e-30), torch.ones_like(n))
    elif norm == "l1":
        out = project_l1(flat, e)
    elif norm == "l0":
        out = project_l0(flat, e)
    else:
        raise ValueError(f"unknown norm {norm!r}")
    return out.reshape(delta.shape)


__all__ = ["project_ball", "project_l0", "project_l1"]
