"""Per-example Jacobian spectra and their dynamical-isometry statistics (the result types of
:func:`gradlab.probes.jacobian.jacobian_probe`; see that module for what is measured).

A :class:`LayerSpectrum` holds one map's singular values for every example; a
:class:`JacobianReport` the maps of one probe, with the per-example statistics averaged over
examples (Saxe et al. 2014; Pennington, Schoenholz & Ganguli 2017), the cumulative product of
spectral norms over depth and the gain-per-layer verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from gradlab.probes.gradnorm import DEFAULT_THRESHOLD, verdict_from_rate

NEAR_ONE = 0.1  # "within 10% of 1"

SUMMARY_COLUMNS = [
    "layer", "depth", "in_dim", "out_dim", "method", "n_sv", "mean_sq_sv", "var_sq_sv", "max_sv",
    "min_sv", "condition_number", "frac_near_one", "spectral_radius", "cum_spectral_norm", "converged",
    "mean_log_abs_det", "trace_minus_n",
]


@dataclass
class LayerSpectrum:
    """Spectra of one map for every example.

    ``singular_values`` (B, r_or_k) float64, descending; ``spectral_radius`` (B,) or None;
    ``moments`` (B, 2) = per-example (tr G / r, tr G^2 / r) Hutchinson estimates in Lanczos mode,
    None when dense; ``jacobian`` (B, m, n) only when asked for (``keep_jacobians``).
    Square dense maps also keep ``log_abs_det`` (B,), ``log|det J_b|`` (slogdet), and
    ``trace_minus_n`` (B,), ``tr(J_b) - n``: for a residual block ``J = I + eps A`` that is
    ``eps tr(A)``, the first-order term of ``log det J = eps tr(A) + O(eps^2)``.
    """

    name: str
    depth: Optional[int]  # block index (head = number of blocks); None for the input-output map
    in_dim: int
    out_dim: int
    method: str
    singular_values: Tensor = field(repr=False)
    converged: bool = True
    iterations: int = 0
    spectral_radius: Optional[Tensor] = field(default=None, repr=False)
    moments: Optional[Tensor] = field(default=None, repr=False)
    jacobian: Optional[Tensor] = field(default=None, repr=False)
    log_abs_det: Optional[Tensor] = field(default=None, repr=False)
    trace_minus_n: Optional[Tensor] = field(default=None, repr=False)

    @property
    def full(self) -> bool:
        return self.method == "dense"

    def stats(self) -> dict:
        """Per-example statistics averaged over examples (see the module docstring)."""
        s = self.singular_values
        nan = float("nan")
        out = {"n_sv": s.shape[1], "max_sv": float(s[:, 0].mean())}
        if self.full:
            sq = s.pow(2)
            smin = s[:, -1]
            cond = torch.where(smin > 0, s[:, 0] / smin, torch.full_like(smin, math.inf))
            out.update(
                mean_sq_sv=float(sq.mean(1).mean()),
                var_sq_sv=float(sq.var(1, unbiased=False).mean()),
                min_sv=float(smin.mean()),
                condition_number=float(cond.mean()),
                frac_near_one=float(((s - 1).abs() <= NEAR_ONE).double().mean(1).mean()),
            )
        else:
            m1, m2 = self.moments[:, 0], self.moments[:, 1]
            out.update(
                mean_sq_sv=float(m1.mean()),
                var_sq_sv=float((m2 - m1.pow(2)).clamp_min(0).mean()),
                min_sv=nan, condition_number=nan, frac_near_one=nan,
            )
        out["spectral_radius"] = nan if self.spectral_radius is None else float(self.spectral_radius.mean())
        out["mean_log_abs_det"] = nan if self.log_abs_det is None else float(self.log_abs_det.mean())
        out["trace_minus_n"] = nan if self.trace_minus_n is None else float(self.trace_minus_n.mean())
        return out


@dataclass
class JacobianReport:
    """What :func:`jacobian_probe` returns: the input-output map first, then the layers by depth."""

    layers: list[LayerSpectrum]
    space: str  # "normalized" or "pixel"
    n_examples: int
    notes: list[str] = field(default_factory=list)
    hidden_span: Optional[tuple[int, int]] = None  # blocks a..b-1 of the "hidden-to-hidden" map

    def map(self, name: str) -> Optional[LayerSpectrum]:
        """The map called ``name`` (``input-output``, ``hidden-to-hidden``, ``blocks.3``, ``head``), or None."""
        return next((ls for ls in self.layers if ls.name == name), None)

    def cumulative_spectral_norm(self) -> dict[str, float]:
        """``name -> mean over examples of prod_{j <= l} ||J_j||_2`` over the probed layers."""
        out, running = {}, None
        for ls in self.layers:
            if ls.depth is None:
                continue
            top = ls.singular_values[:, 0]
            running = top if running is None else running * top
            out[ls.name] = float(running.mean())
        return out

    def summary(self):
        """``jacobian_summary.csv``: one row per map with the columns of ``SUMMARY_COLUMNS``."""
        import pandas as pd

        cum = self.cumulative_spectral_norm()
        rows = []
        for ls in self.layers:
            row = {"layer": ls.name, "depth": ls.depth, "in_dim": ls.in_dim, "out_dim": ls.out_dim,
                   "method": ls.method, "converged": ls.converged}
            row.update(ls.stats())
            row["cum_spectral_norm"] = cum.get(ls.name, float("nan"))
            rows.append(row)
        return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)

    def spectra_frame(self):
        """``jacobian.csv``: long format ``layer,example,index,singular_value`` (index 0 = largest)."""
        import pandas as pd

        parts = []
        for ls in self.layers:
            b, r = ls.singular_values.shape
            parts.append(pd.DataFrame({
                "layer": ls.name,
                "example": torch.arange(b).repeat_interleave(r).numpy(),
                "index": torch.arange(r).repeat(b).numpy(),
                "singular_value": ls.singular_values.reshape(-1).numpy(),
            }))
        return pd.concat(parts, ignore_index=True)

    def to_frames(self):
        """``(jacobian.csv frame, jacobian_summary.csv frame)``."""
        return self.spectra_frame(), self.summary()

    def verdict_basis(self) -> tuple[list[LayerSpectrum], list[float], str]:
        """The per-layer maps the verdict rests on, their gains ``chi`` and the basis in words.

        The square (width x width) per-layer maps when there are any: for them ``mean_sq_sv =
        ||J||_F^2 / n`` is the mean-field ``chi_1`` of Poole et al. 2016 / Schoenholz et al. 2017
        (``sigma_w^2 E[phi'(h)^2]``; 1 at criticality, e.g. ReLU with ``sigma_w^2 = 2``). The first
        (inputs -> width) and last (width -> classes) maps are left out: their mean squared singular
        value carries their shape (``||J||_F^2 / min(m, n)`` of a 256 x 64 map at criticality is ~4)
        and the head has no nonlinearity (its gain is ``sigma_w^2``). Without square maps every
        per-layer map is normalised by its shape, ``chi = ||J||_F^2 / out_dim`` (the gain of the mean
        squared activation per unit).
        """
        per_layer = [ls for ls in self.layers if ls.depth is not None]
        square = [ls for ls in per_layer if ls.in_dim == ls.out_dim]
        if square:
            return square, [ls.stats()["mean_sq_sv"] for ls in square], f"{len(square)} square hidden layer map(s)"
        chi = [ls.stats()["mean_sq_sv"] * min(ls.in_dim, ls.out_dim) / ls.out_dim for ls in per_layer]
        return per_layer, chi, f"{len(per_layer)} layer map(s), each normalised by its shape (no square maps)"

    def gain_rate(self, threshold: float = DEFAULT_THRESHOLD) -> tuple[float, str]:
        """Typical gain per layer and its verdict: ``(rate, vanishing|exploding|stable|undetermined)``.

        ``sqrt(chi)`` of a layer map is the factor by which it scales the norm of a random
        direction; the rate is its geometric mean over the maps of :meth:`verdict_basis`, and the
        verdict uses the rule of :mod:`gradlab.probes.gradnorm` (``|log rate| > log(1 + t)``).
        """
        _, chi, _ = self.verdict_basis()
        if not chi:
            return float("nan"), "undetermined"
        log_rate = 0.5 * sum(math.log(max(c, 1e-300)) for c in chi) / len(chi)
        return math.exp(log_rate), verdict_from_rate(log_rate, threshold)

    def metrics(self, threshold: float = DEFAULT_THRESHOLD) -> dict:
        """The input-output statistics (prefixed ``io_``), the hidden-to-hidden ones (``hh_``), gain
        rate, verdict and the maps it rests on, for ``summary.csv``."""
        io = self.layers[0].stats()
        keys = ["mean_sq_sv", "var_sq_sv", "max_sv", "min_sv", "condition_number", "frac_near_one"]
        out = {f"io_{k}": io[k] for k in keys}
        hidden = self.map("hidden-to-hidden")
        if hidden is not None:
            hs = hidden.stats()
            out.update({f"hh_{k}": hs[k] for k in keys + ["spectral_radius"]})
        cum = self.cumulative_spectral_norm()
        if cum:
            out["cum_spectral_norm"] = list(cum.values())[-1]
            out["gain_rate"], out["verdict"] = self.gain_rate(threshold)
            maps, _, basis = self.verdict_basis()
            out["verdict_basis"] = basis
            out["verdict_layers"] = " ".join(ls.name for ls in maps)
        dets = [ls for ls in self.layers if ls.depth is not None and ls.log_abs_det is not None]
        if dets:  # mean over the square block maps of the mean over examples (-inf: a singular map)
            out["block_log_abs_det"] = sum(float(ls.log_abs_det.mean()) for ls in dets) / len(dets)
            out["block_trace_minus_n"] = sum(float(ls.trace_minus_n.mean()) for ls in dets) / len(dets)
        return out



def log_det_and_trace(jac: Tensor) -> tuple[Tensor, Tensor]:
    """``(log|det J_b|, tr(J_b) - n)`` (B,) float64 of square per-example Jacobians (B, n, n):
    one batched ``slogdet`` (LU) in float64, ``-inf`` for a singular map."""
    j = jac.double()
    return torch.linalg.slogdet(j).logabsdet, j.diagonal(dim1=-2, dim2=-1).sum(-1) - j.shape[-1]


def spectral_radius(jac: Tensor) -> Tensor:
    """``max |eig(J_b)|`` (B,) float64 of square per-example Jacobians ``jac`` (B, n, n).

    ``torch.linalg.eigvals`` (LAPACK ``geev``: balancing, which already permutes zero rows and
    columns out, Hessenberg reduction, then the sequential QR iteration) run with ONE intra-op
    thread, restored afterwards: the QR iteration gains nothing from threads, and with several
    threads its many small BLAS-2 calls make the threads wait for each other (measured in
    ``benchmarks/bench_jacobian.py --radius``, figures in ``benchmarks/RESULTS.md``). Krylov
    methods were measured and rejected: the spectrum of a random-like layer Jacobian fills a disk
    (the circular law), so ARPACK's ``eigs(k=1)`` stops at a non-dominant eigenvalue and an
    unrestarted Arnoldi needs ~n/3 steps, slower than LAPACK at these sizes.
    """
    if jac.shape[-1] == 0:
        return torch.zeros(jac.shape[0], dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigvals(jac).abs().amax(-1).double()
    finally:
        torch.set_num_threads(threads)
