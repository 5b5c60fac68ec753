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

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlab.curvature import (
    MATRICES,
    HessianOperator,
    curvature_matrix,
    eigsh,
    slq_density,
)
from gradlab.curvature.gauss_newton import TRACE_METHODS
from gradlab.core.errors import GradlabError, check
from gradlab.core.options import Option, Options
from gradlab.probes import PROBES
from gradlab.probes.base import Probe, ProbeContext, ProbeReport
from gradlab.probes.critical import GRAD_TOL, classify_point
from gradlab.probes import streamed as st
from gradlab.probes.hessian_exact import error_bounds, exact_parts
from gradlab.probes.hessian_report import FRAME_COLUMNS, HessianReport, stability_bound
from gradlab.probes.hessian_text import overview_frame, summary_lines
from gradlab.probes.source import batch_options

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
    matrix: str = "hessian",
    dist=None,
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
        matrix: the curvature matrix probed, one of :data:`gradlab.curvature.MATRICES` ("hessian",
            "ggn", "fisher" with one Monte Carlo label per example, "empirical-fisher", "kfac"). The
            loss and gradient are always the loss's; the point type needs the Hessian's signs, so
            for any other matrix it is left "unknown" (those matrices are positive semi-definite).
        dist: under torchrun, the :class:`~gradlab.core.distributed.DistInfo`: every rank passes the
            same batches, takes its share and all-reduces each product (:mod:`gradlab.curvature.distributed`).
    Raises:
        GradlabError: top_k < 1, bottom_k < 0, tol <= 0, unknown trace method or matrix, k > n,
            ``exact`` with more than ``dense_max`` parameters, or the Gauss-Newton trace of a matrix
            other than the Hessian.
    """
    check(isinstance(top_k, int) and top_k >= 1, f"invalid top_k: {top_k} (must be >= 1)")
    check(isinstance(bottom_k, int) and bottom_k >= 0, f"invalid bottom_k: {bottom_k} (must be >= 0)")
    check(tol > 0, f"invalid tol: {tol} (must be > 0)")
    check(trace_method in TRACE_METHODS,
          f"unknown trace method {trace_method!r}; choose from: {', '.join(TRACE_METHODS)}")
    check(lr is None or lr > 0, f"invalid lr: {lr} (must be > 0)")
    check(matrix in MATRICES, f"unknown curvature matrix {matrix!r}; choose from: {', '.join(MATRICES)}")
    check(matrix == "hessian" or trace_method != "gauss-newton",
          f"trace method 'gauss-newton' estimates the Hessian's trace; with matrix {matrix!r} choose "
          f"auto, xtrace, krylov, hutch++ or hutchinson")
    split = dist is not None and dist.enabled
    streamed = st.is_stream(data_batches)  # a streamed dataset: batch by batch (gradlab.probes.streamed)
    if split and not streamed:
        from gradlab.curvature.distributed import DistributedOperator, shard_batches

        check(matrix != "kfac", "matrix 'kfac' is not a mean of per-rank matrices: run it in one process")
        data_batches = shard_batches(data_batches, dist)
    if streamed:
        hop = op = st.streamed_operator(model, loss_fn or F.cross_entropy, data_batches, matrix=matrix, mode=mode,
                                        seed=seed, backend=backend, dist=dist, trace_method=trace_method)
    else:
        op = HessianOperator(model, loss_fn or F.cross_entropy, data_batches, backend=backend, mode=mode, seed=seed)
        hop = op = DistributedOperator(op, dist) if split else op  # the loss and gradient: the Hessian's
    if matrix != "hessian" and not streamed:
        op = curvature_matrix(matrix, model, loss_fn or F.cross_entropy, data_batches, mode=mode, seed=seed)
        op = DistributedOperator(op, dist) if split else op
    try:
        loss, g = hop.loss_and_gradient()
        grad_norm = float(torch.linalg.vector_norm(g))
        if exact:
            top, bottom, tr, dens = exact_parts(model, loss_fn or F.cross_entropy, op, top_k, bottom_k,
                                                 trace, density, density_starts, density_steps, dense_max, seed)
        else:
            top = eigsh(op, top_k, "LA", tol=tol, max_iter=max_iter, seed=seed)
            bottom = eigsh(op, bottom_k, "SA", tol=tol, max_iter=max_iter, seed=seed + 1) if bottom_k else None
            if trace and matrix == "kfac":  # sum of tr(G) tr(A) over the layers: exact, no products
                from gradlab.curvature import TraceResult

                tr = TraceResult(op.trace(), 0.0, 0, "exact (K-FAC factors)")
            else:
                tr = TRACE_METHODS[trace_method](op, trace_matvecs, seed=seed + 2) if trace else None
            dens = slq_density(op, density_starts, density_steps, seed=seed + 3) if density else None
    finally:
        for o in {id(hop): hop, id(op): op}.values():  # free the kept graphs now, not at garbage collection
            if hasattr(o, "clear"):
                o.clear()
    notes = []
    if matrix != "hessian":
        notes.append(f"eigenvalues, trace and 2/lambda_max are of {MATRICES[matrix]}, not of the Hessian; "
                     f"the point type needs the Hessian (--matrix hessian)")
    if not top.converged:
        notes.append(f"top eigenvalues not converged to tol={tol:g} within {top.num_matvecs} products")
    if bottom is not None and not bottom.converged:
        notes.append(f"bottom eigenvalues not converged to tol={tol:g} within {bottom.num_matvecs} products")
    lam_max = float(top.values[0])
    bound = stability_bound(lam_max)
    top_list = top.values.tolist()
    bottom_list = bottom.values.tolist() if bottom is not None else []
    hessian = matrix == "hessian"  # the others are positive semi-definite: no bottom eigenvalues to weigh
    cls = classify_point(grad_norm, top_list, bottom_list if hessian else [], grad_tol=grad_tol,
                         **error_bounds(top, bottom if hessian else None, op.n, op.dtype, tol, exact))
    return HessianReport(
        top=top_list, bottom=bottom_list, top_converged=top.converged,
        bottom_converged=True if bottom is None else bottom.converged,
        trace=None if tr is None else tr.estimate, trace_stderr=None if tr is None else tr.stderr,
        trace_method=None if tr is None else tr.method, loss=loss, grad_norm=grad_norm,
        lambda_max=lam_max, stability_bound=bound, lr=lr, lr_above_bound=lr is not None and lr > bound,
        classification=cls, density=dens, num_params=op.n, num_samples=op.num_samples,
        num_matvecs=op.num_matvecs, mode=mode, backend=hop.backend, notes=notes, matrix=matrix,
    )


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


# -- the registered probe: options, checks, report -------------------------------------------
#: Optimizers whose step is plain (S)GD-like, so that 2/lambda_max bounds their learning rate.

OPTIONS = Options(
    Option("top_k", int, 5, "Number of largest eigenvalues", low=1),
    Option("bottom_k", int, 1, "Number of smallest eigenvalues (>= 1 is needed to tell a minimum from a saddle)", low=0),
    Option("trace", bool, True, "Estimate the trace with a standard error"),
    Option("density", bool, False, "Spectral density by stochastic Lanczos quadrature (plot + density rows)",
           paper="Ghorbani et al. 2019"),
) + batch_options(4, 512, "Batches of --batch-size to average the loss over; 0 = the whole split", low=0) + Options(
    Option("tol", float, 1e-3, "Eigen-solver relative residual tolerance", low=0, low_open=True),
    Option("backend", str, "auto", "HVP backend (auto = double-backward)", choices=("auto", "double-backward", "func")),
    Option("mode", str, "eval", "Model mode for the products: eval (dropout off, BatchNorm running stats) or train "
           "(batch stats, fixed dropout masks); the model is restored", choices=("eval", "train")),
    Option("trace_method", str, "auto", "Trace method: auto (gauss-newton where the layers allow, else xtrace), "
           "gauss-newton (exact for ReLU-type nets), xtrace, krylov, hutch++, hutchinson", choices=tuple(TRACE_METHODS)),
    Option("trace_matvecs", int, 60, "Budget for the trace: Hessian-vector products, or gauss-newton residual "
           "samples (about one HVP each)", low=4),
    Option("lr", float, None, "Learning rate to compare with 2/lambda_max (default: the --run's lr)", low=0, low_open=True),
    Option("grad_tol", float, GRAD_TOL, "Gradient norm above which the point is 'not a critical point'", low=0, low_open=True),
    Option("exact", bool, False, "Eigenvalues and trace from the dense Hessian (small models only, see --dense-max)"),
    Option("dense_max", int, 5000, "Largest parameter count for --exact (the dense Hessian needs n^2 memory and n products)", low=1),
    Option("matrix", str, "hessian", "Curvature matrix: hessian, ggn (generalised Gauss-Newton), fisher (true Fisher, one "
           "label per example sampled from the model), empirical-fisher (gradients at the data's labels: not the Fisher), "
           "kfac (Kronecker-factored, Linear/Conv2d layers only)", choices=tuple(MATRICES),
           paper="Schraudolph 2002; Martens 2020; Kunstner et al. 2019; Martens & Grosse 2015"),
    Option("per_layer", bool, False, "Also each layer's own matrix (a GradlabNet's blocks and head; else every module "
           "owning parameters): top-k, trace, density per block in hessian_blocks.csv and a bar chart"),
    Option("params", str, None, "Blocks by parameter name: comma-separated globs or module prefixes, one block each "
           "('fc1,fc2', '*.bias'; join with + for one block: 'fc1+fc2'); with --per-layer each split into layers"),
    Option("verify", bool, False, "Check the solvers on a random block of --verify-size coordinates against its dense "
           "matrix (built apart): eigenvalue and trace errors beside the residual bounds and stderr (hessian_verify.csv)"),
    Option("compare", str, None, "During training (--probe hessian:compare=ggn): also lambda_max and trace of this "
           "matrix", choices=tuple(m for m in MATRICES if m != "hessian")),
    Option("verify_size", int, 200, "Coordinates of the --verify block (the dense reference costs one pass each)", low=1),
)


@PROBES.register("hessian", "Hessian eigenvalues, trace, density, stability bound 2/lambda_max, point type",
                 options=OPTIONS, paper="Ghorbani et al. 2019; Cohen et al. 2021")
class HessianProbe(Probe):
    """Hessian of the training loss: top-k/bottom-k eigenvalues, trace, density, stability bound.

    Compares the gradient-descent stability bound 2/lambda_max with the learning rate (the run's, or --lr).

    Classifies the point: minimum, saddle, maximum, degenerate, or not a critical point (gradient norm above --grad-tol).

    Writes hessian.csv (kind,index,value,stderr) and TensorBoard scalars; with --density also plots/hessian_density.png (logged as a TensorBoard image) and hessian_density.csv.

    --per-layer / --params: each block's own matrix (hessian_blocks.csv, plots/hessian_blocks.png); --verify: the figures checked on a random dense block (hessian_verify.csv).
    """

    training_split = "curvature"  # metrics.csv split of its rows during training
    training_summary = ("lambda_max", "trace")  # their last values go into summary.csv

    def draw(self, source, options, seed: int) -> list:
        if getattr(source.data, "streamed", False):  # the whole split read batch by batch
            return st.stream_batches(source, options)
        x, y = source.split()
        return [(xb.to(source.device), yb.to(source.device))
                for xb, yb in as_batches(x, y, options["batch_size"], options["batches"] or None)]

    def prepare(self, ctx: ProbeContext) -> dict:
        o = ctx.options
        run_cfg = ctx.source.run_config if ctx.source is not None else {}
        ctx.state["lr"] = o["lr"] if o["lr"] is not None else run_cfg.get("lr")
        n_params = sum(p.numel() for p in ctx.model.parameters() if p.requires_grad)
        if o["top_k"] > n_params or o["bottom_k"] > n_params:
            raise GradlabError(f"invalid top-k/bottom-k: the model has only {n_params} parameters")
        if o["exact"] and n_params > o["dense_max"]:
            raise GradlabError(f"--exact: model too large for the dense Hessian ({n_params} parameters > "
                               f"--dense-max {o['dense_max']}); drop --exact to use the HVP solvers")
        if o["per_layer"] or o["params"] is not None:  # a pattern that matches nothing: before the run folder
            from gradlab.curvature.blocks import parameter_blocks

            parameter_blocks(ctx.model, o["params"], o["per_layer"])
        return {"lr_compared": ctx.state["lr"]}

    def run(self, ctx: ProbeContext) -> ProbeReport:
        from gradlab.probes.spectra_plots import hessian_density_figure

        o = ctx.options
        rep = hessian_probe(
            ctx.model, ctx.batches, top_k=o["top_k"], bottom_k=o["bottom_k"], trace=o["trace"], density=o["density"],
            tol=o["tol"], lr=ctx.state.get("lr"), loss_fn=ctx.loss_fn,
            backend=None if o["backend"] == "auto" else o["backend"], mode=o["mode"], trace_method=o["trace_method"],
            trace_matvecs=o["trace_matvecs"], grad_tol=o["grad_tol"], exact=o["exact"], dense_max=o["dense_max"],
            seed=ctx.seed, matrix=o["matrix"], dist=ctx.dist,
        )
        metrics = rep.metrics()
        opt = ctx.source.run_config.get("opt") if ctx.source is not None else None
        title = ""
        if ctx.source is not None:
            title = (f"{'Hessian' if rep.matrix == 'hessian' else rep.matrix}: {ctx.source.where}, {rep.num_samples} {ctx.source.split_name} examples, "
                     f"{rep.num_params} parameters, mode={rep.mode}"
                     + (f", backend={rep.backend}" if rep.matrix == "hessian" else ""))
        report = ProbeReport(
            table=rep.to_frame(), view=overview_frame(rep), title=title, scalars=metrics,
            series={"hessian/top_eigenvalue": [(i + 1, v) for i, v in enumerate(rep.top)],
                    "hessian/bottom_eigenvalue": [(i + 1, v) for i, v in enumerate(rep.bottom)]},
            summary_lines=summary_lines(rep, opt), metrics={**metrics, "classification": rep.classification.kind},
        )
        if rep.density is not None:
            report.tables["hessian_density"] = rep.density_frame()
            report.figures["hessian_density"] = hessian_density_figure(rep)
        if o["per_layer"] or o["params"] is not None:
            from gradlab.probes.hessian_blocks import add_block_outputs

            add_block_outputs(ctx, rep, report)
        if o["verify"]:
            from gradlab.probes.hessian_verify import add_verify_outputs

            add_verify_outputs(ctx, report)
        return report

    def scalars(self, model, loss_fn, batch, **options) -> dict:
        """``lambda_max``, ``trace``, ``stability_bound`` on one batch, and with ``compare``,
        ``density`` and ``lr`` the other matrix's, the Morse index and the stability margin
        (:func:`gradlab.probes.curvature_train.training_curvature`; trace budget 20 by default)."""
        from gradlab.probes.curvature_train import training_curvature

        return training_curvature(model, loss_fn, tuple(batch), tol=options.get("tol", 1e-3),
                                  trace_matvecs=options.get("trace_matvecs", 20), mode=options.get("mode", "eval"),
                                  compare=options.get("compare"), density=options.get("density", False),
                                  lr=options.get("lr"))


__all__ = ["FRAME_COLUMNS", "OPTIONS", "HessianProbe", "HessianReport", "as_batches", "hessian_probe",
           "quick_curvature", "stability_bound"]
