"""The Hessian probe: extremal eigenvalues, trace, spectral density, stability bound, point type.

Everything goes through :mod:`gradlab.curvature` (one :class:`HessianOperator` shared by all
solvers). Reported quantities, for the mean loss over the given batches:

* top-k / bottom-k eigenvalues (Lanczos, :func:`gradlab.curvature.eigsh`);
* the trace with a standard error: by default (``"auto"``) the Gauss-Newton split
  (:mod:`gradlab.curvature.gauss_newton`: exact for piecewise-linear networks, an exact
  Gauss-Newton part plus a per-example residual estimate otherwise), falling back to XTrace
  (Epperly, Tropp & Webber 2024) for layers it does not support; Lanczos-deflated Hutchinson
  (:func:`~gradlab.curvature.krylov_trace`), Hutch++ (Meyer et al. 2021) or Hutchinson on request;
* the gradient norm, the loss, and the gradient-descent stability bound ``2 / lambda_max``
  (a quadratic with curvature ``lambda`` diverges under GD with ``lr > 2 / lambda``; Cohen et al.
  2021 show training hovers at this "edge of stability"), compared with a learning rate;
* the point's classification (:mod:`gradlab.probes.critical`);
* optionally the spectral density by stochastic Lanczos quadrature (Ghorbani et al. 2019).

:func:`quick_curvature` is the cheap version (lambda_max and a trace) for ``train --hessian-every``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlab.curvature import (
    DensityResult,
    HessianOperator,
    eigsh,
    slq_density,
)
from gradlab.curvature.gauss_newton import TRACE_METHODS
from gradlab.core.errors import GradlabError, check
from gradlab.probes import PROBES
from gradlab.probes.critical import GRAD_TOL, CriticalPoint, classify_point

FRAME_COLUMNS = ["kind", "index", "value", "stderr"]


@dataclass
class HessianReport:
    """Result of :func:`hessian_probe`. Eigenvalues are float64 lists: ``top`` descending
    (``top[0] = lambda_max``), ``bottom`` ascending (``bottom[0] = lambda_min``)."""

    top: list
    bottom: list
    top_converged: bool
    bottom_converged: bool
    trace: Optional[float]
    trace_stderr: Optional[float]
    trace_method: Optional[str]
    loss: float
    grad_norm: float
    lambda_max: float
    stability_bound: float  # 2 / lambda_max (inf when lambda_max <= 0)
    lr: Optional[float]
    lr_above_bound: bool
    classification: CriticalPoint
    density: Optional[DensityResult]
    num_params: int
    num_samples: int
    num_matvecs: int
    mode: str
    backend: str
    notes: list = field(default_factory=list)

    def to_frame(self):
        """Long table with columns ``kind,index,value,stderr``.

        ``eigenvalue`` rows: index ``1..k`` for the top eigenvalues (1 = largest) and ``-1..-k``
        for the bottom ones (-1 = smallest); ``trace``: one row, index 0, with its stderr;
        ``density``: index = grid point ``i`` (the grid itself is :meth:`density_frame`).
        """
        import pandas as pd

        rows = [("eigenvalue", i + 1, v, float("nan")) for i, v in enumerate(self.top)]
        rows += [("eigenvalue", -(i + 1), v, float("nan")) for i, v in enumerate(self.bottom)]
        if self.trace is not None:
            rows.append(("trace", 0, self.trace, self.trace_stderr))
        if self.density is not None:
            rows += [("density", i, float(d), float("nan")) for i, d in enumerate(self.density.density)]
        return pd.DataFrame(rows, columns=FRAME_COLUMNS)

    def density_frame(self):
        """``index,eigenvalue,density`` on the SLQ grid (empty when no density was computed)."""
        import pandas as pd

        if self.density is None:
            return pd.DataFrame(columns=["index", "eigenvalue", "density"])
        d = self.density
        return pd.DataFrame({"index": range(len(d.grid)), "eigenvalue": d.grid.tolist(), "density": d.density.tolist()})

    def metrics(self) -> dict:
        """Scalars for TensorBoard and summary.csv."""
        out = {"lambda_max": self.lambda_max, "grad_norm": self.grad_norm, "loss": self.loss,
               "stability_bound": self.stability_bound, "num_matvecs": self.num_matvecs}
        if self.bottom:
            out["lambda_min"] = self.bottom[0]
        if self.trace is not None:
            out["trace"], out["trace_stderr"] = self.trace, self.trace_stderr
        if self.classification.neg_pos_ratio is not None:
            out["neg_pos_ratio"] = self.classification.neg_pos_ratio
        return out


def stability_bound(lambda_max: float) -> float:
    """``2 / lambda_max``: the largest stable gradient-descent step on the local quadratic."""
    return 2.0 / lambda_max if lambda_max > 0 else math.inf


@PROBES.register("hessian", "Hessian eigenvalues, trace, density, stability bound 2/lambda_max, point type",
                 options="--top-k --bottom-k --trace --density --batches --tol")
def hessian_probe(
    model: nn.Module,
    data_batches,
    top_k: int = 5,
    bottom_k: int = 1,
    trace: bool = True,
    density: bool = False,
    tol: float = 1e-3,
    lr: Optional[float] = None,
    *,
    loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    backend: Optional[str] = None,
    mode: str = "eval",
    trace_method: str = "auto",
    trace_matvecs: int = 60,
    density_starts: int = 4,
    density_steps: int = 60,
    max_iter: Optional[int] = None,
    grad_tol: float = GRAD_TOL,
    exact: bool = False,
    dense_max: int = 5000,
    seed: int = 0,
) -> HessianReport:
    """Probe the Hessian of the mean loss of ``model`` over ``data_batches``.

    Args:
        model: the network (left unchanged; its mode flags are restored).
        data_batches: one ``(x, y)`` batch or a list of them (mean over all their samples).
        top_k: number of largest eigenvalues (>= 1). bottom_k: smallest ones (>= 0; 1 by default,
            needed for the minimum/saddle verdict).
        trace: estimate tr(H) with ``trace_method`` ("auto", "gauss-newton", "xtrace", "krylov",
            "hutch++", "hutchinson") and a budget of ``trace_matvecs`` products (Gauss-Newton:
            residual samples, each about one HVP; none for piecewise-linear networks). density: SLQ density with ``density_starts`` x ``density_steps``.
        tol: eigen-solver relative tolerance (> 0); lr: learning rate compared with 2/lambda_max.
        loss_fn: ``(logits, y) -> mean loss``, default cross-entropy; backend/mode: see
            :class:`~gradlab.curvature.HessianOperator`; grad_tol: see :mod:`gradlab.probes.critical`.
        exact: eigenvalues and trace from the dense Hessian (:func:`~gradlab.curvature.dense_hessian`,
            models with at most ``dense_max`` parameters): exact, trace stderr 0.
    Raises:
        GradlabError: top_k < 1, bottom_k < 0, tol <= 0, unknown trace method, k > n, or
            ``exact`` with more than ``dense_max`` parameters.
    """
    check(isinstance(top_k, int) and top_k >= 1, f"invalid top_k: {top_k} (must be >= 1)")
    check(isinstance(bottom_k, int) and bottom_k >= 0, f"invalid bottom_k: {bottom_k} (must be >= 0)")
    check(tol > 0, f"invalid tol: {tol} (must be > 0)")
    check(trace_method in TRACE_METHODS,
          f"unknown trace method {trace_method!r}; choose from: {', '.join(TRACE_METHODS)}")
    check(lr is None or lr > 0, f"invalid lr: {lr} (must be > 0)")
    op = HessianOperator(model, loss_fn or F.cross_entropy, data_batches, backend=backend, mode=mode, seed=seed)
    try:
        loss, g = op.loss_and_gradient()
        grad_norm = float(torch.linalg.vector_norm(g))
        if exact:
            top, bottom, tr, dens = _exact_parts(model, loss_fn or F.cross_entropy, op, top_k, bottom_k,
                                                 trace, density, density_starts, density_steps, dense_max, seed)
        else:
            top = eigsh(op, top_k, "LA", tol=tol, max_iter=max_iter, seed=seed)
            bottom = eigsh(op, bottom_k, "SA", tol=tol, max_iter=max_iter, seed=seed + 1) if bottom_k else None
            tr = TRACE_METHODS[trace_method](op, trace_matvecs, seed=seed + 2) if trace else None
            dens = slq_density(op, density_starts, density_steps, seed=seed + 3) if density else None
    finally:
        op.clear()  # free the kept gradient graphs now, not at garbage collection
    notes = []
    if not top.converged:
        notes.append(f"top eigenvalues not converged to tol={tol:g} within {top.num_matvecs} products")
    if bottom is not None and not bottom.converged:
        notes.append(f"bottom eigenvalues not converged to tol={tol:g} within {bottom.num_matvecs} products")
    lam_max = float(top.values[0])
    bound = stability_bound(lam_max)
    top_list = top.values.tolist()
    bottom_list = bottom.values.tolist() if bottom is not None else []
    cls = classify_point(grad_norm, top_list, bottom_list, grad_tol=grad_tol)
    return HessianReport(
        top=top_list, bottom=bottom_list, top_converged=top.converged,
        bottom_converged=True if bottom is None else bottom.converged,
        trace=None if tr is None else tr.estimate, trace_stderr=None if tr is None else tr.stderr,
        trace_method=None if tr is None else tr.method, loss=loss, grad_norm=grad_norm,
        lambda_max=lam_max, stability_bound=bound, lr=lr, lr_above_bound=lr is not None and lr > bound,
        classification=cls, density=dens, num_params=op.n, num_samples=op.num_samples,
        num_matvecs=op.num_matvecs, mode=mode, backend=op.backend, notes=notes,
    )


def _exact_parts(model, loss_fn, op, top_k, bottom_k, trace, density, starts, steps, dense_max, seed):
    """Top/bottom eigenvalues, trace and density from the dense Hessian (``exact=True``)."""
    from gradlab.curvature import DenseOperator, EigenResult, TraceResult, dense_hessian

    check(top_k <= op.n and bottom_k <= op.n, f"invalid top_k/bottom_k: the model has only {op.n} parameters")
    H = dense_hessian(model, loss_fn, op.batches if len(op.batches) > 1 else op.batches[0], mode=op.mode,
                      params=op.params, max_params=dense_max).to(torch.float64)
    H = (H + H.T) / 2
    ev = torch.linalg.eigvalsh(H)  # ascending
    zero = torch.zeros(max(top_k, bottom_k), dtype=torch.float64)
    top = EigenResult(ev.flip(0)[:top_k], None, 0, True, zero[:top_k], "LA")
    bottom = EigenResult(ev[:bottom_k], None, 0, True, zero[:bottom_k], "SA") if bottom_k else None
    tr = TraceResult(float(ev.sum()), 0.0, 0, "exact") if trace else None
    dens = slq_density(DenseOperator(H), starts, steps, seed=seed + 3) if density else None
    return top, bottom, tr, dens


def quick_curvature(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batch,
    *,
    tol: float = 1e-3,
    trace_matvecs: int = 20,
    mode: str = "eval",
    seed: int = 0,
) -> tuple[float, float]:
    """``(lambda_max, trace)`` of the loss Hessian on ``batch``, cheap enough for every N steps.

    Lanczos for lambda_max (typically 8-12 products at tol 1e-3) and the ``"auto"`` trace with a
    budget of ``trace_matvecs`` products (exact and cheaper for piecewise-linear networks). The model's
    mode flags are restored and nothing is written to ``.grad``.
    """
    op = HessianOperator(model, loss_fn, batch, mode=mode, seed=seed)
    try:
        lam = float(eigsh(op, 1, "LA", tol=tol, seed=seed).values[0])
        tr = TRACE_METHODS["auto"](op, trace_matvecs, seed=seed + 1).estimate
    finally:
        op.clear()
    return lam, tr


def as_batches(x: Tensor, y: Tensor, batch_size: int, num_batches: Optional[int]) -> list:
    """The first ``num_batches`` batches of ``batch_size`` (all of them when None or 0)."""
    if batch_size < 1:
        raise GradlabError(f"invalid batch size: {batch_size} (must be >= 1)")
    n = len(x)
    stop = n if not num_batches else min(n, num_batches * batch_size)
    return [(x[i : min(i + batch_size, stop)], y[i : min(i + batch_size, stop)]) for i in range(0, stop, batch_size)]
