"""The Hutchinson estimate of a matrix diagonal (Bekas, Kokiopoulou & Saad 2007).

For probe vectors ``z`` with independent Rademacher entries, ``E[z * (A z)] = diag(A)``: the
off-diagonal terms ``A_ij z_i z_j`` have mean zero. :func:`hutchinson_diagonal` averages
``z * (A z)`` over ``num_samples`` probes for a matrix seen as blocks (one tensor per parameter,
as AdaHessian and curvature-aware GD use it; Yao et al. 2021); :func:`hutchinson_diag` is the
same estimator for a :class:`~gradlab.curvature.operator.CurvatureOperator` or a dense matrix (a
single flat block), with a per-entry standard error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from gradlab.curvature.operator import as_operator
from gradlab.curvature.sampling import make_generator, rademacher_like
from gradlab.core.errors import check

#: ``product(z, last) -> A z`` blockwise; ``last`` is True for the final probe (a double-backward
#: product may free its graph then).
Product = Callable[[list[Tensor], bool], Sequence[Tensor]]


@dataclass
class DiagonalResult:
    """``estimate`` (n,) of diag(A), per-entry ``stderr`` (n,), products used."""

    estimate: Tensor
    stderr: Tensor
    num_matvecs: int


def hutchinson_diagonal(
    product: Product,
    like: Sequence[Tensor],
    num_samples: int = 1,
    *,
    generator: Optional[torch.Generator] = None,
    draw: Optional[Callable[[Sequence[Tensor]], Sequence[Tensor]]] = None,
    with_stderr: bool = False,
):
    """Mean over ``num_samples`` Rademacher probes ``z`` of ``z * (A z)``, block by block.

    Args:
        product: ``product(z, last)`` returns ``A z`` as one tensor per block of ``like``.
        like: one tensor per block; the probes take their shapes, dtypes and devices.
        num_samples: probes (>= 1).
        generator: source of the probes (:func:`gradlab.curvature.sampling.rademacher_like`).
        draw: ``draw(like)`` replaces the Rademacher draw (tests fix the probes with it).
        with_stderr: also return the per-entry standard error ``std(z * A z) / sqrt(m)``
            (unbiased std; inf for one sample).
    Returns:
        The estimate as one tensor per block, or ``(estimate, stderr)`` with ``with_stderr``.
    """
    check(num_samples >= 1, f"invalid num_samples: {num_samples} (must be >= 1)")
    diag = squares = None
    for i in range(num_samples):
        z = list(draw(like)) if draw is not None else rademacher_like(like, generator)
        hz = list(product(z, i == num_samples - 1))
        if with_stderr:
            sample = torch._foreach_mul(z, hz)
            if diag is None:
                diag, squares = [s.clone() for s in sample], torch._foreach_mul(sample, sample)
            else:
                torch._foreach_add_(diag, sample)
                torch._foreach_addcmul_(squares, sample, sample)
        elif diag is None:
            diag = list(torch._foreach_mul(z, hz))
        else:
            torch._foreach_addcmul_(diag, z, hz)
    if num_samples > 1:
        torch._foreach_div_(diag, num_samples)
    if not with_stderr:
        return diag
    m = num_samples
    if m == 1:
        return diag, [torch.full_like(d, math.inf) for d in diag]
    # unbiased variance from the running sums: (sum x^2 - m mean^2) / (m - 1)
    var = [(sq - m * d * d).clamp_min_(0) / (m - 1) for sq, d in zip(squares, diag)]
    return diag, [v.sqrt_().div_(math.sqrt(m)) for v in var]


def hutchinson_diag(A, num_matvecs: int = 100, *, seed: Optional[int] = 0) -> DiagonalResult:
    """``diag(A)`` of an operator or dense matrix by :func:`hutchinson_diagonal`, in float64.

    Args:
        A: a :class:`~gradlab.curvature.operator.CurvatureOperator` or a dense (n, n) tensor.
        num_matvecs: probes (>= 2, so that a standard error exists).
        seed: seeds the probes.
    Returns:
        :class:`DiagonalResult` with ``estimate`` and ``stderr`` of shape (n,).
    """
    op = as_operator(A)
    check(num_matvecs >= 2, f"invalid num_matvecs: {num_matvecs} (must be >= 2)")
    like = [torch.empty(op.n, dtype=torch.float64, device=op.device)]
    est, se = hutchinson_diagonal(lambda z, last: [op.matvec(z[0])], like, num_matvecs,
                                  generator=make_generator(seed), with_stderr=True)
    return DiagonalResult(est[0], se[0], num_matvecs)
