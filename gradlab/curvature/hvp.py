"""Hessian-vector products: the primitive every curvature consumer is built on.

Double backward (Pearlmutter 1994): with ``g = grad(L, params, create_graph=True)`` built once,
``H v = grad(g . v, params)``. Keeping ``g``'s graph and reusing it for every product of a solve
saves rebuilding it (about one gradient) per product; costs in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from gradlab.curvature.cost import products


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
    # (identical results, never slower than building g . v on the benchmarks' models)
    pairs = [(g, v) for g, v in zip(grads, vecs) if g.requires_grad]  # constant blocks add nothing
    if not pairs:
        return [torch.zeros_like(p) for p in params]
    with products(1):  # one product in a training run's cost (gradlab.curvature.cost)
        out = torch.autograd.grad(
            [g for g, _ in pairs], list(params), grad_outputs=[v for _, v in pairs],
            retain_graph=retain_graph, allow_unused=True,
        )
    return [torch.zeros_like(p) if h is None else h for h, p in zip(out, params)]
