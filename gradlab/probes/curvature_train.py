"""The Hessian probe during training (``train --probe hessian:every=N``, ``--hessian-every N``).

On one batch, every N steps: ``lambda_max`` and ``trace`` of the loss Hessian
(:func:`gradlab.probes.hessian.quick_curvature`), and on request

* ``compare=ggn`` (or fisher, empirical-fisher, kfac): the same two of that matrix, logged as
  ``lambda_max_ggn`` and ``trace_ggn``, so the Hessian and the Gauss-Newton/Fisher matrices can be
  compared over a run;
* ``density=true``: the Morse index, the fraction of negative Hessian eigenvalues, from
  ``density_starts`` Lanczos runs of ``density_steps`` steps (:data:`DENSITY_STARTS` x
  :data:`DENSITY_STEPS` unless the probe's options say otherwise), counted with the Gauss-Radau
  rule that has a node at 0 by :func:`gradlab.probes.hessian_morse.morse_index` (the same code
  as ``gradlab probe hessian --density``):
  ``morse_index`` (the midpoint of each start's exact bracket, averaged), ``morse_index_stderr``
  (their standard error over the starts), ``morse_index_low`` / ``morse_index_high`` (the
  bracket, widened by two standard errors) and ``morse_index_error``, the reported error of the
  value: half the quadrature's ambiguous weight plus two standard errors. The old count (the
  Gauss nodes' weight below 0) has no bracket and is biased by the node nearest 0;
* the stability margin ``lr * lambda_max / 2`` (above 1: plain gradient descent with this step
  diverges along the top eigenvector of the local quadratic; Cohen et al. 2021), with ``lr`` the
  optimizer's current learning rate (the training loop passes it) or the probe's ``lr`` option.
"""

from __future__ import annotations

from typing import Optional

from gradlab.curvature import TRACE_METHODS, curvature_matrix, eigsh, slq_density

#: the training-time Morse index's budget: starts x Lanczos steps (Hessian-vector products)
DENSITY_STARTS, DENSITY_STEPS = 4, 30


def training_curvature(model, loss_fn, batch, *, tol: float = 1e-3, trace_matvecs: int = 20, mode: str = "eval",
                       compare: Optional[str] = None, density: bool = False,
                       density_starts: int = DENSITY_STARTS, density_steps: int = DENSITY_STEPS,
                       lr: Optional[float] = None, seed: int = 0) -> dict:
    """The scalars of the module docstring on one ``(x, y)`` batch (floats)."""
    from gradlab.probes.hessian import quick_curvature, stability_bound
    from gradlab.probes.hessian_morse import morse_index

    lam, tr = quick_curvature(model, loss_fn, batch, tol=tol, trace_matvecs=trace_matvecs, mode=mode, seed=seed)
    out = {"lambda_max": lam, "trace": tr, "stability_bound": stability_bound(lam)}
    if lr is not None:
        out["stability_margin"] = lr * lam / 2
    if compare is not None or density:
        op = curvature_matrix("hessian", model, loss_fn, batch, mode=mode, seed=seed)
        try:
            if density:
                out.update(morse_index(slq_density(op, density_starts, density_steps, seed=seed + 3)))
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


__all__ = ["DENSITY_STARTS", "DENSITY_STEPS", "training_curvature"]
