"""The dense (``--exact``) parts of the Hessian probe and each eigenvalue's error bound."""

from __future__ import annotations

import torch

from gradlab.core.errors import check
from gradlab.curvature import HessianOperator, slq_density
from gradlab.probes.critical import dense_eigenvalues, lanczos_errors


def error_bounds(top, bottom, n: int, dtype: torch.dtype, tol: float, exact: bool) -> dict:
    """Each eigenvalue's error bound for :func:`~gradlab.probes.critical.classify_point`: the dense
    path carries its whole bound in ``residuals``; Lanczos its residuals plus the products' rounding."""
    if exact:
        out = {"top_errors": top.residuals.tolist()}
        if bottom is not None:
            out["bottom_errors"] = bottom.residuals.tolist()
        return out
    scale = max(float(top.values.abs().max()), float(bottom.values.abs().max()) if bottom is not None else 0.0)
    out = {"top_errors": lanczos_errors(top.values, top.residuals, n, dtype, scale=scale, tol=tol)}
    if bottom is not None:
        out["bottom_errors"] = lanczos_errors(bottom.values, bottom.residuals, n, dtype, scale=scale, tol=tol)
    return out


def exact_parts(model, loss_fn, op, top_k, bottom_k, trace, density, starts, steps, dense_max, seed):
    """Top/bottom eigenvalues, trace and density from the dense Hessian (``exact=True``)."""
    from gradlab.curvature import DenseOperator, EigenResult, TraceResult, dense_hessian

    check(top_k <= op.n and bottom_k <= op.n, f"invalid top_k/bottom_k: the model has only {op.n} parameters")
    if isinstance(op, HessianOperator):
        H = dense_hessian(model, loss_fn, op.batches if len(op.batches) > 1 else op.batches[0], mode=op.mode,
                          params=op.params, max_params=dense_max)
    else:  # any other curvature matrix, column by column
        H = op.to_dense()
    ev, err = dense_eigenvalues(H)  # ascending, with the dense solver's error bound
    H = (H.to(torch.float64) + H.to(torch.float64).T) / 2
    # the error bound stands in for the residuals; the products' rounding is already in it
    bound = torch.full((max(top_k, bottom_k),), err, dtype=torch.float64)
    top = EigenResult(ev.flip(0)[:top_k], None, 0, True, bound[:top_k], "LA")
    bottom = EigenResult(ev[:bottom_k], None, 0, True, bound[:bottom_k], "SA") if bottom_k else None
    tr = TraceResult(float(ev.sum()), 0.0, 0, "exact") if trace else None
    dens = slq_density(DenseOperator(H), starts, steps, seed=seed + 3) if density else None
    return top, bottom, tr, dens
