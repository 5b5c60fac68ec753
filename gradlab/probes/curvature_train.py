"""The Hessian probe during training (``train --probe hessian:every=N``, ``--hessian-every N``).

On one batch, every N steps: ``lambda_max`` and ``trace`` of the loss Hessian
(:func:`gradlab.probes.hessian.quick_curvature`), and on request

* ``compare=ggn`` (or fisher, empirical-fisher, kfac): the same two of that matrix, logged as
  ``lambda_max_ggn`` and ``trace_ggn``, so the Hessian and the Gauss-Newton/Fisher matrices can be
  compared over a run;
* ``density=true``: the Morse index, the fraction of negative Hessian eigenvalues from an SLQ
  density (``morse_index`` with ``morse_index_stderr`` over the starts,
  :meth:`gradlab.curvature.density.DensityResult.fraction_below`);
* the stability margin ``lr * lambda_max / 2`` (above 1: plain gradient descent with this step
  diverges along the top eigenvector of the local quadratic; Cohen et al. 2021), with ``lr`` the
  optimizer's current learning rate (the training loop passes it) or the probe's ``lr`` option.
"""

from __future__ import annotations

from typing import Optional

from gradlab.curvature import TRACE_METHODS, curvature_matrix, eigsh, slq_density


def training_curvature(model, loss_fn, batch, *, tol: float = 1e-3, trace_matvecs: int = 20, mode: str = "eval",
                       compare: Optional[str] = None, density: bool = False, density_starts: int = 2,
                       density_steps: int = 30, lr: Optional[float] = None, seed: int = 0) -> dict:
    """The scalars of the module docstring on one ``(x, y)`` batch (floats)."""
    from gradlab.probes.hessian import quick_curvature, stability_bound

    lam, tr = quick_curvature(model, loss_fn, batch, tol=tol, trace_matvecs=trace_matvecs, mode=mode, seed=seed)
    out = {"lambda_max": lam, "trace": tr, "stability_bound": stability_bound(lam)}
    if lr is not None:
        out["stability_margin"] = lr * lam / 2
    if compare is not None or density:
        op = curvature_matrix("hessian", model, loss_fn, batch, mode=mode, seed=seed)
        try:
            if density:
                d = slq_density(op, density_starts, density_steps, seed=seed + 3)
                m = d.fraction_below(0.0, zero_tol=1e-6 * float(d.nodes.abs().max()))
                out["morse_index"], out["morse_index_stderr"] = m.value, m.std_error
        finally:
            op.clear()
    if compare is not None:
        op = curvature_matrix(compare, model, loss_fn, batch, mode=mode, seed=seed)
        try:
            key = compare.replace("-", "_")
            out[f"lambda_max_{key}"] = float(eigsh(op, 1, "LA", tol=tol, seed=seed).values[0])
            out[f"trace_{key}"] = (op.trace() if compare == "kfac"
                                   else TRACE_METHODS["xtrace"](op, trace_matvecs, seed=seed + 1).estimate)
        finally:
            if hasattr(op, "clear"):
                op.clear()
    return {k: float(v) for k, v in out.items()}


__all__ = ["training_curvature"]
