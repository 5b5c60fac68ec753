"""The result of ``gradlab probe hessian`` (:class:`HessianReport`) and its tables: the long
``hessian.csv`` (eigenvalues, trace, Morse index with its bracket, density), the density grid
and the scalars for TensorBoard and ``summary.csv``. The computation is
:func:`gradlab.probes.hessian.hessian_probe`; the Morse index is
:mod:`gradlab.probes.hessian_morse`'s, the same as during training."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from gradlab.curvature import DensityResult
from gradlab.probes.critical import CriticalPoint
from gradlab.probes.hessian_morse import morse_fraction
from gradlab.probes.hessian_morse import morse_index as morse_scalars

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
    matrix: str = "hessian"  # which curvature matrix the eigenvalues, trace and density are of

    def to_frame(self):
        """Long table with columns ``kind,index,value,stderr``.

        ``eigenvalue`` rows: index ``1..k`` for the top eigenvalues (1 = largest) and ``-1..-k``
        for the bottom ones (-1 = smallest); ``trace``: one row, index 0, with its stderr; with a
        density of the Hessian, ``morse_index`` (its stderr), ``morse_index_low`` and
        ``morse_index_high`` (the Gauss-Radau bracket) and ``morse_index_error`` (index 0);
        ``density``: index = grid point ``i`` (the grid itself is :meth:`density_frame`).
        """
        import pandas as pd

        nan = float("nan")
        rows = [("eigenvalue", i + 1, v, nan) for i, v in enumerate(self.top)]
        rows += [("eigenvalue", -(i + 1), v, nan) for i, v in enumerate(self.bottom)]
        if self.trace is not None:
            rows.append(("trace", 0, self.trace, self.trace_stderr))
        morse = self.morse()
        if morse:
            rows.append(("morse_index", 0, morse["morse_index"], morse["morse_index_stderr"]))
            rows += [(key, 0, morse[key], nan) for key in ("morse_index_low", "morse_index_high", "morse_index_error")]
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
        out.update(self.morse())
        return out

    def morse(self) -> dict:
        """The Morse index scalars of :func:`gradlab.probes.hessian_morse.morse_index` (value,
        stderr, bracket, error) when a density of the Hessian was computed, else ``{}``."""
        if self.density is None or self.matrix != "hessian":
            return {}
        return morse_scalars(self.density)

    def morse_index(self):
        """The fraction of negative eigenvalues (the Morse index over the dimension) from the SLQ
        density as a :class:`~gradlab.curvature.density.SpectralFraction` (value, std_error,
        low/high bracket, ambiguous weight), by :func:`gradlab.probes.hessian_morse.morse_fraction`."""
        return morse_fraction(self.density)


def stability_bound(lambda_max: float) -> float:
    """``2 / lambda_max``: the largest stable gradient-descent step on the local quadratic."""
    return 2.0 / lambda_max if lambda_max > 0 else math.inf


__all__ = ["FRAME_COLUMNS", "HessianReport", "stability_bound"]
