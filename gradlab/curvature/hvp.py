"""Hessian-vector products: the primitive every curvature consumer is built on.

Double backward (Pearlmutter 1994): with ``g = grad(L, params, create_graph=True)`` built once,
``H v = grad(g . v, params)``. Keeping ``g``'s graph and reusing it for every product of a solve
costs about 1.4-2x one gradient on CPU; rebuilding it per product costs 2.4-2.8x.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def hvp_from_grads(
    grads: Sequence[Tensor], params: Sequence[Tensor], vecs: Sequence[Tensor], *, retain_graph: bool = True
) -> list[Tensor]:
    """``H v`` for each parameter block, from gradients built with ``create_graph=True``.

    Args:
        grads: ``grad(L, params, create_graph=True)``; their graph is kept (``retain_graph``)
            so the next product reuses it.
        params: the tensors the gradient was taken with respect to.
        vecs: one tensor per parameter, same shapes.
    Returns:
        One tensor per parameter; a parameter the gradient does not depend on gets zeros.
    """
    # grad_outputs = v computes d(g . v)/d(params) without adding the product g * v to the graph
    # (measured on digits: ~2x cheaper on a 26k-parameter MLP, equal on a CNN; identical results)
    pairs = [(g, v) for g, v in zip(grads, vecs) if g.requires_grad]  # constant blocks add nothing
    if not pairs:
        return [torch.zeros_like(p) for p in params]
    out = torch.autograd.grad(
        [g for g, _ in pairs], list(params), grad_outputs=[v for _, v in pairs],
        retain_graph=retain_graph, allow_unused=True,
    )
    return [torch.zeros_like(p) if h is None else h for h, p in zip(out, params)]


_SIGN_TABLES: dict = {}


def _sign_table(dtype: torch.dtype, device) -> Tensor:
    """(256, 8) table whose row b holds the eight bits of b as +-1 (bit 0 first)."""
    key = (dtype, str(device))
    table = _SIGN_TABLES.get(key)
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = _SIGN_TABLES[key] = (bits * 2 - 1).to(dtype=dtype, device=device)
    return table


def rademacher_like(tensors: Sequence[Tensor], generator: Optional[torch.Generator] = None) -> list[Tensor]:
    """Independent +-1 entries with the shapes, dtypes and devices of ``tensors``.

    One random byte gives eight signs through a 256-row table, and all tensors of one dtype and
    device share one draw (returned as views of it): on a 26k-parameter MLP this is ~30 us
    instead of ~250-450 us for one ``randint`` per tensor, which was a fifth of an SGD step and
    sat on every AdaHessian refresh.
    """
    out: list = [None] * len(tensors)
    groups: dict = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    for (dtype, device), idx in groups.items():
        sizes = [tensors[i].numel() for i in idx]
        n = sum(sizes)
        draw_device = "cpu" if generator is not None else device
        table = _sign_table(dtype, draw_device)
        byte = torch.randint(0, 256, ((n + 7) // 8,), generator=generator, device=draw_device)
        flat = torch.index_select(table, 0, byte).view(-1)[:n].to(device)
        for i, part in zip(idx, torch.split(flat, sizes)):
            out[i] = part.view(tensors[i].shape)
    return out


def hutchinson_diagonal(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    n_samples: int = 1,
    generator: Optional[torch.Generator] = None,
    vecs: Optional[Sequence[Sequence[Tensor]]] = None,
) -> list[Tensor]:
    """Unbiased estimate of diag(H): the mean over Rademacher z of ``z * (H z)`` (Bekas et al. 2007).

    ``vecs`` fixes the probe vectors (a list of ``n_samples`` lists of per-parameter tensors),
    which tests use to compare with a hand computation.
    """
    diag = [torch.zeros_like(p) for p in params]
    for i in range(n_samples):
        z = vecs[i] if vecs is not None else rademacher_like(params, generator)
        hz = hvp_from_grads(grads, params, z)
        for d, zi, hzi in zip(diag, z, hz):
            d.add_(zi * hzi, alpha=1.0 / n_samples)
    return diag
