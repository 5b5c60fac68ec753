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
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure

from gradlab.probes.gradnorm import GradnormReport
from gradlab.probes.jacobian_spectra import JacobianReport


def gradnorm_figure(report: GradnormReport) -> Figure:
    """Norms of every probed layer against its depth index, log scale; title gives the verdict."""
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
        a = np.mean(sig + report.log_rate * depth)
        ax.plot(depth, np.exp(a - report.log_rate * depth), "k--", lw=1, label="log-linear fit")
    ax.set_yscale("log")
    ax.set_xlabel("layer (depth index; head last)")
    ax.set_ylabel("L2 norm")
    ax.set_title(f"{report.verdict}: signal x{report.rate:.3g} per layer towards the input "
                 f"(threshold {report.threshold:g})", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def spectra_figure(report: JacobianReport, max_panels: int = 12) -> Figure:
    """Histograms of log10 singular values (all examples pooled), one panel per map."""
    chosen = _spread(report.layers, max_panels)
    cols = min(4, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig = Figure(figsize=(3.0 * cols, 2.3 * rows))
    for i, ls in enumerate(chosen):
        ax = fig.add_subplot(rows, cols, i + 1)
        sv = ls.singular_values.flatten().numpy()
        logs = np.log10(sv[sv > 0]) if (sv > 0).any() else np.array([-30.0])
        lo, hi = float(logs.min()), float(logs.max())
        if hi - lo < 0.2:  # (near-)isometric maps: a readable window, not one 1e-7 wide
            lo, hi = 0.5 * (lo + hi) - 0.5, 0.5 * (lo + hi) + 0.5
        ax.hist(logs, bins=40, range=(lo, hi), color="C0" if ls.depth is None else "C1")
        ax.axvline(0.0, color="k", lw=0.8, ls=":")  # singular value 1: isometry
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
    """Per-layer statistics against depth; the cumulative product shows the exponential trend."""
    summary = report.summary()
    per_layer = summary[summary["depth"].notna()]
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    depth = per_layer["depth"].to_numpy(dtype=float)
    ax.plot(depth, _positive(per_layer["max_sv"]), "o-", ms=3, label="spectral norm (max sv)")
    ax.plot(depth, _positive(np.sqrt(per_layer["mean_sq_sv"])), "s-", ms=3, label="rms singular value")
    if per_layer["min_sv"].notna().any():
        ax.plot(depth, _positive(per_layer["min_sv"]), "v-", ms=3, label="min singular value")
    ax.plot(depth, _positive(per_layer["cum_spectral_norm"]), "k--", label="cumulative product of spectral norms")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_yscale("log")
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
