"""``gradlab probe hessian --verify``: how far to trust the figures, checked on a dense block.

A seeded random set of at most ``size`` coordinates is drawn from the probed parameters; the
matrix restricted to them (its principal submatrix ``A[S, S]``) is

* built densely and independently of the operator's products
  (:func:`gradlab.curvature.reference.dense_at`: torch.func / autograd column by column);
* and seen through the same operator the probe uses
  (:class:`~gradlab.curvature.blocks.CoordinateOperator` around it), on which the same solvers run:
  Lanczos top-k with its residuals and the trace estimator with its standard error.

The report sets the largest disagreement of the Lanczos eigenvalues with the dense ones beside
the Lanczos residual bound (for a symmetric matrix each Ritz value is within its residual norm of
an eigenvalue), the trace estimate's error beside its standard error, and the operator's products
against the dense matrix's. ``consistent`` when each error is within its bound plus the
products' rounding (``100 eps ||A||`` in the operator's dtype) and the trace within 4 standard
errors. The trace uses an operator-only method (``auto`` and ``gauss-newton`` become ``xtrace``:
the Gauss-Newton split needs whole layers, not coordinates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from gradlab.curvature import curvature_matrix, eigsh
from gradlab.curvature.blocks import CoordinateOperator, random_coordinates
from gradlab.curvature.params import select_params
from gradlab.curvature.reference import dense_at
from gradlab.curvature.sampling import gaussian, make_generator
from gradlab.curvature.trace import OPERATOR_TRACE_METHODS as OPERATOR_TRACES

VERIFY_COLUMNS = ["kind", "index", "operator", "dense", "error", "bound"]


@dataclass
class Verification:
    """The comparison on one random coordinate block (module docstring); errors are absolute."""

    matrix: str
    size: int
    of: int
    params: list
    lanczos: list
    dense: list
    residuals: list
    eig_error: float
    eig_bound: float
    trace: float
    trace_stderr: float
    trace_dense: float
    trace_method: str
    product_error: float  # max over test vectors of ||A_op v - A v|| / ||A v||
    rounding: float  # 100 eps ||A|| in the operator's dtype
    seed: int

    @property
    def trace_error(self) -> float:
        return abs(self.trace - self.trace_dense)

    @property
    def eig_consistent(self) -> bool:
        return self.eig_error <= self.eig_bound + self.rounding

    @property
    def trace_consistent(self) -> bool:
        slack = 4 * self.trace_stderr if math.isfinite(self.trace_stderr) else math.inf
        return self.trace_error <= slack + self.rounding * math.sqrt(self.size)

    @property
    def consistent(self) -> bool:
        scale = max(abs(v) for v in self.dense) if self.dense else 1.0
        return self.eig_consistent and self.trace_consistent and self.product_error * scale <= 10 * self.rounding

    def frame(self):
        """``hessian_verify.csv``: eigenvalue rows (Lanczos, dense, |diff|, residual), the trace
        (estimate, dense, |diff|, stderr) and the products (relative error)."""
        import pandas as pd

        rows = [("eigenvalue", i + 1, a, b, abs(a - b), r)
                for i, (a, b, r) in enumerate(zip(self.lanczos, self.dense, self.residuals))]
        rows.append(("trace", 0, self.trace, self.trace_dense, self.trace_error, self.trace_stderr))
        rows.append(("product", 0, math.nan, math.nan, self.product_error, self.rounding))
        return pd.DataFrame(rows, columns=VERIFY_COLUMNS)

    def metrics(self) -> dict:
        return {"verify_eig_error": self.eig_error, "verify_eig_bound": self.eig_bound,
                "verify_trace_error": self.trace_error, "verify_trace_stderr": self.trace_stderr,
                "verify_product_error": self.product_error, "verify_consistent": float(self.consistent)}

    def line(self) -> str:
        verdict = "consistent" if self.consistent else "DISAGREE: do not trust these figures"
        se = f"{self.trace_error / self.trace_stderr:.2g} stderr" if self.trace_stderr > 0 else "stderr 0"
        return (f"verify ({self.size} random coordinates of {self.of}, seed {self.seed}): top-{len(self.lanczos)} "
                f"Lanczos eigenvalues within {self.eig_error:.2g} of the dense block's (residual bound "
                f"{self.eig_bound:.2g}); trace {self.trace:.4g} vs dense {self.trace_dense:.4g} ({se}, "
                f"{self.trace_method}); products agree to {self.product_error:.2g}: {verdict}")


def verify_curvature(model, loss_fn, batches, *, matrix: str = "hessian", params: Optional[str] = None,
                     size: int = 200, top_k: int = 5, tol: float = 1e-3, trace_method: str = "auto",
                     trace_matvecs: int = 60, mode: str = "eval", backend: Optional[str] = None, seed: int = 0,
                     transform: Optional[Callable] = None) -> Verification:
    """Compare the solvers on ``matrix`` with a dense reference on a random coordinate block.

    Args:
        params: the probed parameters (``--params`` patterns; ``+`` reads as ``,``), None for all.
        size: at most this many coordinates (seeded by ``seed``).
        transform: ``op -> operator`` applied to the probe's operator before restricting it (the
            tests pass a deliberately wrong one); the reference is always built from ``op``.
        Other arguments as for :func:`gradlab.probes.hessian.hessian_probe`.
    """
    tensors, names = select_params(model, None if params is None else str(params).replace("+", ","))
    sizes = [p.numel() for p in tensors]
    chosen = random_coordinates(sizes, size, seed)
    starts = torch.tensor([0] + sizes).cumsum(0)
    owner = torch.searchsorted(starts[1:], chosen, right=True)
    used = sorted(set(owner.tolist()))
    sub_starts = {j: int(s) for j, s in zip(used, torch.tensor([0] + [sizes[j] for j in used]).cumsum(0))}
    local = torch.tensor([sub_starts[int(j)] + int(c - starts[j]) for c, j in zip(chosen, owner)])
    op = curvature_matrix(matrix, model, loss_fn, batches, mode=mode, params=[tensors[j] for j in used], seed=seed,
                          backend=backend)
    try:
        sub = CoordinateOperator(transform(op) if transform is not None else op, local)
        D = dense_at(matrix, op, local).to(torch.float64)
        ev = torch.linalg.eigvalsh(D).flip(0)
        k = min(top_k, sub.n)
        top = eigsh(sub, k, "LA", tol=tol, seed=seed)
        method = "xtrace" if trace_method in ("auto", "gauss-newton") else trace_method
        tr = OPERATOR_TRACES[method](sub, trace_matvecs, seed=seed + 2)
        V = torch.stack([gaussian(sub.n, make_generator(seed + 5 + j)) for j in range(3)], dim=1)
        DV = D @ V.to(D.device)
        AV = sub.matmat(V.to(D.device)).to(torch.float64)
        prod_err = float((torch.linalg.vector_norm(AV - DV, dim=0) / torch.linalg.vector_norm(DV, dim=0)
                          .clamp_min(1e-300)).max())
    finally:
        if hasattr(op, "clear"):
            op.clear()
    lan = top.values.tolist()
    dense = ev[:k].tolist()
    res = top.residuals.tolist()
    rounding = 100 * torch.finfo(op.dtype).eps * float(ev.abs().max())
    return Verification(matrix, sub.n, sum(sizes), [names[j] for j in used], lan, dense, res,
                        max(abs(a - b) for a, b in zip(lan, dense)), max(res), tr.estimate, tr.stderr,
                        float(ev.sum()), tr.method, prod_err, rounding, seed)


def add_verify_outputs(ctx, report) -> None:
    """``--verify`` rows in ``hessian_verify.csv``, its line in the summary, its scalars."""
    o = ctx.options
    ver = verify_curvature(ctx.model, ctx.loss_fn, ctx.batches, matrix=o["matrix"], params=o["params"],
                           size=o["verify_size"], top_k=o["top_k"], tol=o["tol"], trace_method=o["trace_method"],
                           trace_matvecs=o["trace_matvecs"], mode=o["mode"],
                           backend=None if o["backend"] == "auto" else o["backend"], seed=ctx.seed)
    report.tables["hessian_verify"] = ver.frame()
    report.summary_lines.append(ver.line())
    report.scalars.update(ver.metrics())
    report.metrics.update(ver.metrics())


__all__ = ["VERIFY_COLUMNS", "Verification", "add_verify_outputs", "verify_curvature"]
