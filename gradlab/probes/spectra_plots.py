"""Figures for the gradient-norm, Jacobian and Hessian probes (matplotlib ``Figure`` objects, no pyplot state).

* :func:`gradnorm_figure`: gradient, weight and backward-signal norms against depth (log y) with
  the fitted signal-norm line behind the verdict.
* :func:`spectra_figure`: a histogram of log10 singular values per map (at most ``max_panels``
  maps, evenly spread over depth, the input-output map first).
* :func:`depth_figure`: per-layer spectral statistics against depth (log y): spectral norm,
  root-mean-square singular value, smallest singular value, cumulative product of spectral norms.
* :func:`hessian_density_figure`: the Hessian's SLQ spectral density (log y) with the computed
  extreme eigenvalues marked.
* :func:`sweep_figure`: the experiment figure: a panel per (statistic, activation), the
  statistic against depth, a line per (init, residual) pair.

A log axis cannot show zero: a dead layer's zero gradient norm, or a Jacobian's zero singular
values, are counted and named in the panel ("2 layers with zero grad norm", "12 of 64 zero"), and
zero layers are marked on the axis's bottom edge, never drawn as a point or a bar at 1e-37.
Layer indices are integers, so every depth axis has integer ticks.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import blended_transform_factory

from gradlab.probes.gradnorm import GradnormReport
from gradlab.probes.jacobian_spectra import JacobianReport


def gradnorm_figure(report: GradnormReport) -> Figure:
    """Norms of every probed layer against its depth index, log scale; title gives the verdict.

    Layers whose norm is exactly zero (dead units: a ReLU layer that never fires passes no
    gradient) are marked with an x on the bottom edge and counted in a note, not left as a gap."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    depth = np.array([lg.layer for lg in report.layers], dtype=float)
    series = {
        "grad norm": [lg.grad_norm for lg in report.layers],
        "weight norm": [lg.weight_norm for lg in report.layers],
        "signal norm dL/dh (per example)": [lg.signal_norm for lg in report.layers],
    }
    for (label, vals), marker in zip(series.items(), "osD"):
        ax.plot(depth, _positive(vals), marker=marker, ms=3, label=label)
    if not math.isnan(report.log_rate):  # the fit: log s = a - log_rate * depth
        sig = np.log(_positive(series["signal norm dL/dh (per example)"]))
        ok = np.isfinite(sig)
        if ok.any():
            a = np.mean(sig[ok] + report.log_rate * depth[ok])
            ax.plot(depth, np.exp(a - report.log_rate * depth), "k--", lw=1, label="log-linear fit")
    ax.set_yscale("log")
    notes = _mark_zero_layers(ax, depth, [lg.name for lg in report.layers], series)
    _integer_ticks(ax)
    ax.set_xlabel("layer (depth index; head last)")
    ax.set_ylabel("L2 norm")
    ax.set_title(f"{report.verdict}: signal x{report.rate:.3g} per layer towards the input "
                 f"(threshold {report.threshold:g})", fontsize=9)
    if notes:
        ax.text(0.01, 0.06, "\n".join(notes), transform=ax.transAxes, fontsize=7, color="tab:red", va="bottom")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def _mark_zero_layers(ax, depth: np.ndarray, names: list, series: dict) -> list[str]:
    """Mark the layers where a series is exactly zero on the bottom edge of a log axis; return
    one note per series, e.g. ``"2 layers with zero grad norm (dead): blocks.1, blocks.2"``."""
    edge = blended_transform_factory(ax.transData, ax.transAxes)  # x in data, y in axes fraction
    notes, marked = [], False
    for label, vals in series.items():
        zero = np.asarray(vals, dtype=float) == 0
        if not zero.any():
            continue
        ax.plot(depth[zero], np.full(int(zero.sum()), 0.02), "x", color="tab:red", ms=7, mew=2, clip_on=False,
                transform=edge, label=None if marked else "zero (not on a log axis)")
        marked = True
        shown = [n for n, z in zip(names, zero) if z]
        more = f", +{len(shown) - 4} more" if len(shown) > 4 else ""
        notes.append(f"{len(shown)} layer{'s' if len(shown) > 1 else ''} with zero {label.split(' (')[0]} "
                     f"(dead): {', '.join(shown[:4])}{more}")
    return notes


def _integer_ticks(ax) -> None:
    """Layer indices are integers: ticks only at integers (never 0.5 or 2.5 on a short net)."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def spectra_figure(report: JacobianReport, max_panels: int = 12) -> Figure:
    """Histograms of log10 singular values (all examples pooled), one panel per map."""
    chosen = _spread(report.layers, max_panels)
    cols = min(4, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig = Figure(figsize=(3.0 * cols, 2.3 * rows))
    for i, ls in enumerate(chosen):
        ax = fig.add_subplot(rows, cols, i + 1)
        sv = ls.singular_values.numpy()
        zero = numerical_zeros(sv, ls.in_dim, ls.out_dim)
        logs = np.log10(sv[~zero])
        if logs.size:
            lo, hi = float(logs.min()), float(logs.max())
            if hi - lo < 0.2:  # (near-)isometric maps: a readable window, not one 1e-7 wide
                lo, hi = 0.5 * (lo + hi) - 0.5, 0.5 * (lo + hi) + 0.5
            ax.hist(logs, bins=40, range=(lo, hi), color="C0" if ls.depth is None else "C1")
        ax.axvline(0.0, color="k", lw=0.8, ls=":")  # singular value 1: isometry
        if zero.any():  # their own count: log10(0) has no bin, and 1e-37 rounding noise is no value
            ax.text(0.02, 0.95, f"{int(zero.sum())} of {zero.size} zero", transform=ax.transAxes, fontsize=7,
                    color="tab:red", va="top")
        kind = "top-k, Lanczos" if ls.method == "lanczos" else "all"
        ax.set_title(f"{ls.name} ({kind})", fontsize=8)
        ax.tick_params(labelsize=7)
        if i % cols == 0:
            ax.set_ylabel("count", fontsize=8)
        if i >= len(chosen) - cols:
            ax.set_xlabel("log10 singular value", fontsize=8)
    fig.suptitle(f"Jacobian singular values ({report.space} input, {report.n_examples} examples)", fontsize=9)
    fig.tight_layout()
    return fig


def depth_figure(report: JacobianReport) -> Figure:
    """Per-layer statistics against depth; the cumulative product shows the exponential trend.

    A layer whose smallest singular value is zero to working precision for every example
    (:func:`numerical_zeros`: a rank-deficient map, e.g. dead ReLU units) shows it as a zero
    marked on the bottom edge, not as the SVD's rounding noise near 1e-37."""
    summary = report.summary()
    per_layer = summary[summary["depth"].notna()]
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    depth = per_layer["depth"].to_numpy(dtype=float)
    spectra = {ls.name: ls for ls in report.layers}
    max_sv = per_layer["max_sv"].to_numpy(dtype=float)
    min_sv = per_layer["min_sv"].to_numpy(dtype=float).copy()
    for i, name in enumerate(per_layer["layer"]):
        ls = spectra.get(name)
        if ls is None or not ls.full:
            continue
        if numerical_zeros(ls.singular_values.numpy(), ls.in_dim, ls.out_dim)[:, -1].all():
            min_sv[i] = 0.0
    ax.plot(depth, _positive(max_sv), "o-", ms=3, label="spectral norm (max sv)")
    ax.plot(depth, _positive(np.sqrt(per_layer["mean_sq_sv"])), "s-", ms=3, label="rms singular value")
    zero_series = {"spectral norm": max_sv}
    if per_layer["min_sv"].notna().any():
        ax.plot(depth, _positive(min_sv), "v-", ms=3, label="min singular value")
        zero_series["min singular value"] = min_sv
    ax.plot(depth, _positive(per_layer["cum_spectral_norm"]), "k--", label="cumulative product of spectral norms")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_yscale("log")
    notes = _mark_zero_layers(ax, depth, list(per_layer["layer"]), zero_series)
    if notes:
        ax.text(0.01, 0.06, "\n".join(notes), transform=ax.transAxes, fontsize=7, color="tab:red", va="bottom")
    _integer_ticks(ax)
    ax.set_xlabel("layer (depth index; head last)")
    ax.set_ylabel("singular value (mean over examples)")
    io = summary.iloc[0]
    ax.set_title(f"end-to-end: mean sq sv {io['mean_sq_sv']:.3g}, max sv {io['max_sv']:.3g}, "
                 f"within 10% of 1: {io['frac_near_one']:.2f}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def hessian_density_figure(report) -> Figure:
    """Log-scale SLQ density of a :class:`~gradlab.probes.hessian.HessianReport` with the computed
    extreme eigenvalues marked (Ghorbani et al. 2019 draw it the same way)."""
    d = report.density
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    ax.semilogy(d.grid.numpy(), d.density.clamp_min(1e-12).numpy(), lw=1.2, label="SLQ density")
    for i, v in enumerate(report.top + report.bottom):
        ax.axvline(v, color="tab:red", lw=0.6, alpha=0.6, label="computed eigenvalues" if i == 0 else None)
    ax.set_ylim(bottom=max(1e-8, float(d.density.max()) * 1e-7))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    ax.set_title(f"Hessian spectral density ({d.weights.shape[0]} starts x {d.weights.shape[1]} Lanczos steps, "
                 f"sigma={d.sigma:.2g})")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def sweep_figure(df, rows=(("io_mean_sq_sv", "end-to-end mean sq. singular value"),
                           ("signal_rate", "backward signal factor per layer"))) -> Figure:
    """Grid of panels: a row per ``(column, label)`` in ``rows``, a column per activation.

    Each panel plots the column against depth (log-log), a line per (init, residual) pair.
    ``df`` has columns ``act, init, residual, depth`` plus the plotted ones (e.g. one row per
    combination of ``experiments/vanishing_gradients.yaml``, from the runs' summary.csv files).
    """
    acts = list(dict.fromkeys(df["act"]))
    fig = Figure(figsize=(3.8 * len(acts), 3.2 * len(rows)))
    for r, (value, ylabel) in enumerate(rows):
        for c, act in enumerate(acts):
            ax = fig.add_subplot(len(rows), len(acts), r * len(acts) + c + 1)
            part = df[df["act"] == act]
            for i, ((init, residual), grp) in enumerate(part.groupby(["init", "residual"], sort=True)):
                grp = grp.sort_values("depth")
                ax.plot(grp["depth"], _positive(grp[value]), "--" if residual else "-", marker="o", ms=4,
                        color=f"C{i}", label=f"{init}{' + residual' if residual else ''}")
            ax.axhline(1.0, color="grey", lw=0.8, ls=":")
            if value.endswith("_rate"):  # the verdict's "stable" band for the default threshold 0.1
                ax.axhspan(1 / 1.1, 1.1, color="grey", alpha=0.12, lw=0)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            if r == 0:
                ax.set_title(f"act = {act}", fontsize=10)
            if r == len(rows) - 1:
                ax.set_xlabel("depth (hidden layers)")
            if c == 0:
                ax.set_ylabel(ylabel, fontsize=9)
                ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def numerical_zeros(sv: np.ndarray, in_dim: int, out_dim: int) -> np.ndarray:
    """Boolean mask of the singular values ``sv`` (B, r), per example, that are zero to working
    precision: at most ``max(m, n) * eps * s_max`` with ``eps`` float32's (the Jacobians are
    float32), numpy.linalg.matrix_rank's rule (Golub & Van Loan, "Matrix Computations", 2.6)."""
    sv = np.atleast_2d(np.asarray(sv, dtype=np.float64))
    tol = max(in_dim, out_dim) * np.finfo(np.float32).eps * sv.max(axis=1, keepdims=True)
    return ~np.isfinite(sv) | (sv <= tol)


def _positive(vals) -> np.ndarray:
    """Log axes cannot show 0 or NaN: map them to NaN so the line breaks instead of lying."""
    arr = np.asarray(vals, dtype=float)
    return np.where(arr > 0, arr, np.nan)


def _spread(items: list, n: int) -> list:
    """The first item, then up to ``n - 1`` of the rest evenly spaced (last included)."""
    if len(items) <= n:
        return list(items)
    rest = items[1:]
    idx = np.unique(np.linspace(0, len(rest) - 1, n - 1).round().astype(int))
    return [items[0]] + [rest[i] for i in idx]
