"""Per-block curvature for ``gradlab probe hessian --per-layer`` / ``--params PATTERN``.

A block's matrix is the curvature matrix restricted to that block's parameters, the diagonal
block ``A[b, b]`` of the full matrix (so ``sum_b tr(A[b, b]) = tr(A)`` when the blocks partition
the parameters, and ``lambda_max(A[b, b]) <= lambda_max(A)`` by Cauchy interlacing). Each is built
by the same engine as the whole model's (:func:`gradlab.curvature.curvature_matrix` with
``params=`` the block, :mod:`gradlab.curvature.blocks` for the blocks) and goes through the same
solvers: top-k by Lanczos, the trace by the chosen method, the density by SLQ. A block with no more
parameters than the trace budget gets its trace exactly from one product per coordinate instead.

Outputs: ``hessian_blocks.csv`` (one row per block, the whole model first), with ``--density``
``hessian_blocks_density.csv`` (block, index, eigenvalue, density), the terminal table
(:func:`blocks_view`, within 80 columns) and ``plots/hessian_blocks.png`` (:func:`blocks_figure`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from gradlab.curvature import DenseOperator, EigenResult, TraceResult, curvature_matrix, eigsh, slq_density
from gradlab.curvature.blocks import ParamBlock, parameter_blocks
from gradlab.curvature.gauss_newton import TRACE_METHODS
from gradlab.probes.hessian_morse import morse_fraction, morse_index

WHOLE = "(model)"


@dataclass
class BlockResult:
    """One block's top eigenvalues (descending), trace with its standard error, density."""

    name: str
    params: str
    num_params: int
    top: list
    converged: bool
    max_residual: float
    trace: Optional[float]
    trace_stderr: Optional[float]
    trace_method: Optional[str]
    density: object = None
    num_matvecs: int = 0

    @property
    def lambda_max(self) -> float:
        return self.top[0]

    def morse_index(self):
        """Fraction of negative eigenvalues from the block's SLQ density, with its Gauss-Radau
        bracket (:func:`gradlab.probes.hessian_morse.morse_fraction`)."""
        return morse_fraction(self.density)


def whole_model_row(rep) -> BlockResult:
    """The whole model's row, from the probe's own :class:`~gradlab.probes.hessian.HessianReport`."""
    return BlockResult(WHOLE, "*", rep.num_params, list(rep.top), rep.top_converged, math.nan, rep.trace,
                       rep.trace_stderr, rep.trace_method, rep.density, rep.num_matvecs)


def block_curvature(model, loss_fn, batches, blocks: list[ParamBlock], *, matrix: str = "hessian", top_k: int = 5,
                    trace: bool = True, density: bool = False, tol: float = 1e-3, trace_method: str = "auto",
                    trace_matvecs: int = 60, density_starts: int = 4, density_steps: int = 60, mode: str = "eval",
                    backend: Optional[str] = None, exact: bool = False, seed: int = 0,
                    progress: Optional[Callable[[int, int], None]] = None) -> list[BlockResult]:
    """Top-``top_k`` eigenvalues, trace and density of ``matrix`` restricted to each block.

    ``exact``: from each block's dense matrix (one product per coordinate), trace stderr 0.
    Other arguments as for :func:`gradlab.probes.hessian.hessian_probe`; the seeds are the same
    as the whole model's, so a block equal to the whole model gives the same figures.
    """
    out = []
    for j, blk in enumerate(blocks):
        op = curvature_matrix(matrix, model, loss_fn, batches, mode=mode, params=blk.tensors, seed=seed,
                              backend=backend)
        try:
            k = min(top_k, op.n)
            if exact:
                top, tr, dense = _dense_parts(op, k)
            else:
                top = eigsh(op, k, "LA", tol=tol, seed=seed)
                tr = _trace(op, matrix, trace_method, trace_matvecs, seed) if trace else None
                dense = None
            dens = None
            if density:
                dens = slq_density(dense if dense is not None else op, density_starts, density_steps, seed=seed + 3)
            res = top.residuals
            out.append(BlockResult(
                blk.name, ",".join(str(n) for n in blk.names), op.n, top.values.tolist(), bool(top.converged),
                float(res.max()) if res.numel() else 0.0, None if tr is None else tr.estimate,
                None if tr is None else tr.stderr, None if tr is None else tr.method, dens, op.num_matvecs))
        finally:
            if hasattr(op, "clear"):
                op.clear()
        if progress is not None:
            progress(j + 1, len(blocks))
    return out


def _trace(op, matrix: str, method: str, budget: int, seed: int) -> TraceResult:
    if matrix == "kfac":  # sum over layers of tr(G) tr(A): exact from the factors
        return TraceResult(op.trace(), 0.0, 0, "exact (K-FAC factors)")
    if op.n <= budget:  # as cheap as the estimate: one product per coordinate, exact
        eye = torch.eye(op.n, dtype=torch.float64, device=op.device)
        diag = torch.cat([(op.matmat(eye[:, i:i + 64]) * eye[:, i:i + 64]).sum(0) for i in range(0, op.n, 64)])
        return TraceResult(float(diag.sum()), 0.0, op.n, "exact (unit products)")
    return TRACE_METHODS[method](op, budget, seed=seed + 2)


def _dense_parts(op, k: int):
    from gradlab.probes.critical import dense_eigenvalues

    A = op.to_dense().to(torch.float64)
    A = (A + A.T) / 2
    ev, err = dense_eigenvalues(A)
    top = EigenResult(ev.flip(0)[:k], None, op.n, True, torch.full((k,), err, dtype=torch.float64), "LA")
    return top, TraceResult(float(ev.sum()), 0.0, op.n, "exact"), DenseOperator(A)


def probe_blocks(ctx, rep) -> list[BlockResult]:
    """The blocks asked for by ``--per-layer`` / ``--params`` of a probe context, with the whole
    model's row (``rep``) first."""
    o = ctx.options
    blocks = parameter_blocks(ctx.model, o["params"], o["per_layer"])
    rows = block_curvature(
        ctx.model, ctx.loss_fn, ctx.batches, blocks, matrix=o["matrix"], top_k=o["top_k"], trace=o["trace"],
        density=o["density"], tol=o["tol"], trace_method=o["trace_method"], trace_matvecs=o["trace_matvecs"],
        mode=o["mode"], backend=None if o["backend"] == "auto" else o["backend"], exact=o["exact"], seed=ctx.seed,
        progress=ctx.report_progress)
    return [whole_model_row(rep)] + rows


# -- tables and the figure --------------------------------------------------------------------
def blocks_frame(rows: list[BlockResult], matrix: str = "hessian"):
    """``hessian_blocks.csv``: one row per block, ``lambda_1..lambda_k`` wide."""
    import pandas as pd

    k = max(len(r.top) for r in rows)
    recs = []
    for r in rows:
        rec = {"block": r.name, "params": r.params, "num_params": r.num_params}
        rec.update({f"lambda_{i + 1}": (r.top[i] if i < len(r.top) else math.nan) for i in range(k)})
        rec.update({"converged": r.converged, "max_residual": r.max_residual,
                    "trace": math.nan if r.trace is None else r.trace,
                    "trace_stderr": math.nan if r.trace_stderr is None else r.trace_stderr,
                    "trace_method": r.trace_method or "", "num_matvecs": r.num_matvecs})
        if r.density is not None:
            rec["density_mean"] = r.density.mean
            if matrix == "hessian":
                rec.update(morse_index(r.density))
        recs.append(rec)
    return pd.DataFrame(recs)


def blocks_density_frame(rows: list[BlockResult]):
    """``block,index,eigenvalue,density`` on each block's SLQ grid."""
    import pandas as pd

    recs = [(r.name, i, float(x), float(d)) for r in rows if r.density is not None
            for i, (x, d) in enumerate(zip(r.density.grid.tolist(), r.density.density.tolist()))]
    return pd.DataFrame(recs, columns=["block", "index", "eigenvalue", "density"])


def blocks_view(rows: list[BlockResult], matrix: str = "hessian"):
    """The terminal table (at most ~70 columns): block, size, lambda_max, trace +- stderr and,
    for the Hessian with a density, the share of negative eigenvalues."""
    import pandas as pd

    recs = []
    for r in rows:
        name = r.name if len(r.name) <= 22 else r.name[:10] + "~" + r.name[-11:]
        rec = {"block": name, "params": r.num_params, "lambda_max": r.lambda_max,
               "trace": math.nan if r.trace is None else r.trace,
               "stderr": math.nan if r.trace_stderr is None else r.trace_stderr}
        if r.density is not None and matrix == "hessian":
            rec["neg %"] = 100 * r.morse_index().value
        recs.append(rec)
    return pd.DataFrame(recs)


def blocks_figure(rows: list[BlockResult], matrix: str = "hessian"):
    """Bars of lambda_max and of the trace (with 2 standard errors) per block; the whole model's
    values as dashed lines (a block's lambda_max is at most the model's; its traces add up to it)."""
    import numpy as np
    from matplotlib.figure import Figure

    whole = [r for r in rows if r.name == WHOLE]
    blocks = [r for r in rows if r.name != WHOLE]
    fig = Figure(figsize=(max(6.4, 0.45 * len(blocks) + 2), 5.2))
    axes = fig.subplots(2, 1, sharex=True)
    x = np.arange(len(blocks))
    label = "Hessian" if matrix == "hessian" else matrix
    axes[0].bar(x, [b.lambda_max for b in blocks], color="tab:blue")
    axes[0].set_ylabel(r"$\lambda_{max}$")
    traces = [math.nan if b.trace is None else b.trace for b in blocks]
    errs = [0.0 if b.trace_stderr is None or not math.isfinite(b.trace_stderr) else 2 * b.trace_stderr for b in blocks]
    axes[1].bar(x, traces, yerr=errs, color="tab:orange", capsize=2)
    axes[1].set_ylabel("trace")
    if whole:
        axes[0].axhline(whole[0].lambda_max, ls="--", color="k", lw=1, label=f"whole model {whole[0].lambda_max:.3g}")
        if whole[0].trace is not None:
            axes[1].axhline(whole[0].trace, ls="--", color="k", lw=1, label=f"whole model {whole[0].trace:.3g}")
        for ax in axes:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(True, axis="y", alpha=0.3)
    axes[1].set_xticks(x)
    axes[1].set_xticklabels([b.name for b in blocks], rotation=45, ha="right", fontsize=8)
    axes[0].set_title(f"{label} per block: diagonal blocks, largest eigenvalue and trace", fontsize=9)
    fig.tight_layout()
    return fig


__all__ = ["BlockResult", "WHOLE", "block_curvature", "blocks_density_frame", "blocks_figure", "blocks_frame",
           "blocks_view", "probe_blocks", "whole_model_row"]


def add_block_outputs(ctx, rep, report) -> None:
    """Put the per-block rows of ``--per-layer`` / ``--params`` into the probe's ``report``: the
    CSVs, the terminal table, the bar chart, per-block series and summary scalars."""
    rows = probe_blocks(ctx, rep)
    matrix = rep.matrix
    report.tables["hessian_blocks"] = blocks_frame(rows, matrix)
    if any(r.density is not None for r in rows[1:]):
        report.tables["hessian_blocks_density"] = blocks_density_frame(rows[1:])
    report.figures["hessian_blocks"] = blocks_figure(rows, matrix)
    label = "Hessian" if matrix == "hessian" else matrix
    report.views.append((f"{label} per block (hessian_blocks.csv)",
                         blocks_view(rows, matrix)))
    report.series["hessian/block_lambda_max"] = [(j, r.lambda_max) for j, r in enumerate(rows[1:])]
    if rows[0].trace is not None:
        report.series["hessian/block_trace"] = [(j, r.trace) for j, r in enumerate(rows[1:])]
    top = max(rows[1:], key=lambda r: r.lambda_max)
    report.summary_lines.append(f"blocks: {len(rows) - 1}; the largest block lambda_max is {top.lambda_max:.4g} "
                                f"({top.name}), {top.lambda_max / rows[0].lambda_max:.3g} x the whole model's"
                                if rows[0].lambda_max > 0 else f"blocks: {len(rows) - 1}")
