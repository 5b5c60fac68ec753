"""Input-output and per-layer Jacobian spectra: dynamical isometry, per example.

For a batch ``x`` (B, *input_shape) the probe takes, for every example separately (never summed
over the batch):

* the end-to-end Jacobian ``J = d logits / d h0`` (shape (m, n) = (classes, input numel)), where
  ``h0 = normalize(x)`` is the input after the model's fixed normalisation layer, so the spectrum
  describes the network itself; ``pixel_space=True`` takes it w.r.t. the raw [0, 1] input
  (``J_pixel = J diag(1/std)``);
* per-layer Jacobians ``J_l = d h_{l+1} / d h_l`` of every block of a GradlabNet and its head
  (layer-to-layer maps of an MLP, block-to-block maps of a ResNet or its plain twin).

For each map it returns the singular values and the statistics of the dynamical-isometry
literature (Saxe et al. 2014, "Exact solutions to the nonlinear dynamics of learning in deep
linear networks"; Pennington, Schoenholz & Ganguli 2017, "Resurrecting the sigmoid in deep
learning through dynamical isometry"): mean and variance of the squared singular values, max
(= spectral norm) and min singular value, condition number and the fraction of singular values
within 10% of 1. Per layer it adds the spectral radius ``max |eig(J_l)|`` where ``J_l`` is
square, with ``log|det J_l|`` (batched slogdet) and ``tr(J_l) - n``, which for a residual block
``J = I + eps A`` is ``eps tr(A)``, the first-order term of ``log det J`` (summary.csv adds their
means over the square blocks, ``block_log_abs_det`` and ``block_trace_minus_n``), and the
cumulative product of spectral norms ``prod_{j<=l} ||J_j||_2``: an upper bound
on the end-to-end norm that grows or shrinks exponentially with depth unless every factor is ~1
(a residual block ``I + eps*A`` keeps its factor near 1).

Every statistic is computed per example over its ``r = min(m, n)`` singular values and then
averaged over the examples (the result types are in :mod:`gradlab.probes.jacobian_spectra`).
Singular values are unitless (output units per input unit).

Methods (:mod:`gradlab.curvature.jacobian_gram`). ``dense``: every per-example Jacobian, then
all ``r`` singular values. ``lanczos``: the top ``k`` from batched Lanczos (Lanczos 1950;
:func:`gradlab.curvature.batched.batched_lanczos`) on the matrix-free Gram operator
:class:`~gradlab.curvature.JacobianGram`; there ``tr(G)/r`` and ``tr(G^2)/r`` are Hutchinson
estimates (Hutchinson 1990) and the statistics that need the whole spectrum (min, condition
number, fraction near 1, spectral radius) are NaN. ``auto`` picks ``dense`` while
``B * m * n <= max_dense``.

The model is run in eval mode (per-example maps are only defined without batch statistics) and
its training flags are restored afterwards; no parameter or ``.grad`` is touched. In eval mode a
zoo model treats examples independently, so the batched map's Jacobian is block-diagonal: both
paths differentiate the batched map once for all examples (a model that mixes examples inside
its forward pass in eval mode is outside this probe's contract).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from gradlab.curvature.batched import batched_lanczos
from gradlab.curvature.jacobian_gram import JacobianGram, per_example_jacobian, singular_values
from gradlab.core.errors import GradlabError
from gradlab.core.modelstate import model_state
from gradlab.core.options import Option, Options
from gradlab.models.base import GradlabNet
from gradlab.probes import PROBES
from gradlab.probes.base import Probe, ProbeContext, ProbeReport
from gradlab.probes.gradnorm import DEFAULT_THRESHOLD, select_layers
from gradlab.probes.jacobian_spectra import (  # noqa: F401
    NEAR_ONE,
    SUMMARY_COLUMNS,
    JacobianReport,
    LayerSpectrum,
    log_det_and_trace,
    spectral_radius,
)
from gradlab.probes.source import LAYER_OPTIONS, parse_layers, recalibrate_batchnorm, sample_indices

METHODS = ("auto", "dense", "lanczos")
INPUT_OUTPUT = "input-output"
HIDDEN = "hidden-to-hidden"


def jacobian_probe(
    model: nn.Module,
    x: Tensor,
    *,
    pixel_space: bool = False,
    per_layer: bool = True,
    layers: Optional[Sequence[str]] = None,
    method: str = "auto",
    k: int = 8,
    max_dense: int = 2**24,
    n_probes: int = 16,
    keep_jacobians: bool = False,
    seed: int = 0,
) -> JacobianReport:
    """Per-example Jacobian spectra of ``model`` at the inputs ``x`` (B, *input_shape) in [0, 1].

    Args:
        pixel_space: differentiate w.r.t. the raw input instead of ``normalize(x)``.
        per_layer: also probe every block and the head (GradlabNet only).
        layers: restrict the per-layer maps to these names (``blocks.0`` ... ``head``).
        method: ``auto`` | ``dense`` | ``lanczos`` (module docstring).
        k: how many top singular values Lanczos returns.
        max_dense: ``auto`` uses the dense path while ``B * m * n`` is at most this.
        n_probes: Rademacher probes of the Hutchinson moment estimates (Lanczos mode).
        keep_jacobians: keep the dense (B, m, n) Jacobians on the report (tests, small models).
        seed: seeds the Lanczos start vectors and probes.
    Raises:
        GradlabError: unknown method or layer, k < 1, an empty batch, or a model/block whose
        output is not a tensor.
    """
    if method not in METHODS:
        raise GradlabError(f"unknown method {method!r}; choose from: {', '.join(METHODS)}")
    if k < 1:
        raise GradlabError(f"invalid k: {k} (must be >= 1)")
    if x.ndim < 2 or x.shape[0] < 1:
        raise GradlabError(f"x must be a non-empty batch (B, *input_shape); got shape {tuple(x.shape)}")
    notes: list[str] = []
    span = None
    gen = torch.Generator().manual_seed(seed)
    with model_state(model, train=False):
        with torch.no_grad():
            _check_tensor(model(x[:1]), "model")  # one example: eval mode makes the rest alike
            is_net = isinstance(model, GradlabNet)
            if is_net and not pixel_space:
                acts = model.block_inputs(x) if per_layer else [model.normalize(x)]
                maps = [(INPUT_OUTPUT, None, lambda h: model.forward_from(h, 0), acts[0])]
            else:
                if not is_net and not pixel_space:
                    notes.append("the model is not a GradlabNet (no separate normalize layer): "
                                 "the Jacobian is taken w.r.t. the raw input")
                acts = model.block_inputs(x) if (is_net and per_layer) else None
                maps = [(INPUT_OUTPUT, None, model, x)]
            if per_layer and is_net:
                span = hidden_span([tuple(a.shape) for a in acts])
                if span is not None:
                    maps.append((HIDDEN, None, _chain(model.blocks[span[0]:span[1]]), acts[span[0]]))
                units = [(i, f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
                units.append((len(model.blocks), "head", model.head))
                for depth, name, mod in select_layers(units, layers):
                    maps.append((name, depth, mod, acts[depth]))
            elif per_layer:
                notes.append("per-layer Jacobians need a GradlabNet (normalize -> blocks -> head); skipped")
            spectra = [
                _spectrum(name, depth, fn, h, method, k, max_dense, n_probes, keep_jacobians, gen)
                for name, depth, fn, h in maps
            ]
    rep = JacobianReport(spectra, "pixel" if pixel_space else "normalized", x.shape[0], notes)
    rep.hidden_span = span
    return rep


def hidden_span(shapes: Sequence[tuple]) -> Optional[tuple[int, int]]:
    """``(a, b)``: blocks ``a .. b-1`` form the hidden-to-hidden map, or None.

    ``shapes`` are those of the block inputs ``[h_0, h_1, ..., h_L]`` (``h_L`` enters the head).
    The span is the longest run of consecutive shape-preserving blocks after the first one (the
    first maps the input to the first hidden layer), and only a product of at least two blocks is
    a map of its own: Pennington, Schoenholz & Ganguli (2017, 2018) study this width x width
    product, whose spectrum broadens with depth, not the classes x inputs end-to-end map.
    """
    best, start = None, None
    for i in range(1, len(shapes) - 1):
        square = shapes[i] == shapes[i + 1]
        if square and start is None:
            start = i
        if start is not None and (not square or i == len(shapes) - 2):
            stop = i + 1 if square else i
            if best is None or stop - start > best[1] - best[0]:
                best = (start, stop)
            start = None
    return best if best is not None and best[1] - best[0] >= 2 else None


def _chain(blocks):
    def fn(h):
        for block in blocks:
            h = block(h)
        return h
    return fn


def _spectrum(name, depth, fn, h, method, k, max_dense, n_probes, keep, gen) -> LayerSpectrum:
    out = _check_tensor(fn(h[:1]), name)
    b, m, n = h.shape[0], out[0].numel(), h[0].numel()
    use_dense = method == "dense" or (method == "auto" and b * m * n <= max_dense)
    if use_dense:
        jac = per_example_jacobian(fn, h)
        sv = singular_values(jac)
        radius = spectral_radius(jac) if m == n else None
        logdet, tr = log_det_and_trace(jac) if m == n else (None, None)
        return LayerSpectrum(name, depth, n, m, "dense", sv, spectral_radius=radius,
                             jacobian=jac if keep else None, log_abs_det=logdet, trace_minus_n=tr)
    gram = JacobianGram(fn, h)
    tol = max(1e-10, 1000 * torch.finfo(h.dtype).eps)  # float32: 1.2e-4; |eigenvalue error| <= residual
    v0 = torch.randn(b, gram.size, generator=gen, dtype=torch.float64).to(h.device)
    eig = batched_lanczos(gram, v0, k, tol=tol, generator=gen)
    sv = eig.eigenvalues.clamp_min(0).sqrt()
    moments = gram.moments(n_probes, gen)
    return LayerSpectrum(name, depth, n, m, "lanczos", sv.cpu(), converged=bool(eig.converged.all()),
                         iterations=eig.products, moments=moments.cpu())


def _stat_text(row) -> str:
    return (f"mean squared singular value {row['mean_sq_sv']:.4g}, variance {row['var_sq_sv']:.4g}, max "
            f"{row['max_sv']:.4g}, min {row['min_sv']:.4g}, condition number {row['condition_number']:.4g}, "
            f"within 10% of 1: {row['frac_near_one']:.1%}")


def _check_tensor(out, what: str) -> Tensor:
    if not isinstance(out, Tensor):
        raise GradlabError(
            f"{what} output is a {type(out).__name__}, not a tensor; the Jacobian probe needs maps Tensor -> Tensor"
        )
    return out


TABLE_COLUMNS = ["layer", "method", "n_sv", "mean_sq_sv", "var_sq_sv", "max_sv", "min_sv",
                 "condition_number", "frac_near_one", "spectral_radius", "cum_spectral_norm"]
RECALIBRATION_EXAMPLES = 256

OPTIONS = Options(
    Option("examples", int, 32, "Examples whose Jacobians are taken, one by one", low=1),
) + LAYER_OPTIONS + Options(
    Option("pixel_space", bool, False, "Differentiate w.r.t. the raw [0, 1] pixels instead of the input after the "
           "model's fixed normalisation layer"),
    Option("per_layer", bool, True, "Also take every block's (and the head's) own Jacobian"),
    Option("method", str, "auto", "dense (all singular values: vmap over jacrev/jacfwd), lanczos (top k by Lanczos "
           "on J^T J with JVP/VJP products), or auto = dense while examples x outputs x inputs <= --max-dense",
           choices=METHODS),
    Option("k", int, 8, "Top singular values computed per map by Lanczos", low=1),
    Option("max_dense", int, 2**24, "Largest examples x outputs x inputs that auto computes densely", low=1),
    Option("threshold", float, DEFAULT_THRESHOLD, "Verdict threshold t on the typical gain per layer (geometric "
           "mean of the rms singular values of the square hidden layer maps): below 1/(1+t) 'vanishing', above 1+t "
           "'exploding'", low=0, low_open=True),
)


@PROBES.register("jacobian", "per-example input-output and per-layer Jacobian spectra, dynamical isometry",
                 options=OPTIONS, paper="Saxe et al. 2014; Pennington, Schoenholz & Ganguli 2017")
class JacobianProbe(Probe):
    """Jacobian singular values per example and dynamical-isometry statistics, end to end and per layer.

    Statistics (Saxe et al. 2014, Pennington et al. 2017), per example then averaged: mean and variance of the squared singular values, max (spectral norm) and min singular value, condition number, fraction within 10% of 1; per layer also, for square maps, the spectral radius, the mean log|det J| (batched slogdet) and tr(J) - n (= eps tr(A) for a residual block h + eps f(h), the first-order term of log det J), and the cumulative product of spectral norms over depth. Maps: input-output (classes x inputs), hidden-to-hidden (the width x width product of the hidden blocks, the map Pennington et al. study) and every block and the head. Verdict: the geometric mean of the rms singular values of the square hidden layer maps (the first and last maps carry their shape); below 1/(1+t) 'vanishing', above 1+t 'exploding' (t = --threshold).

    Writes jacobian.csv (layer,example,index,singular_value), jacobian_summary.csv (one row per map), TensorBoard histograms of log10 singular values and per-layer statistics against depth, plots/jacobian_spectra.png and plots/jacobian_depth.png. The model runs in eval mode; a fresh model's BatchNorm running statistics are first set from 256 training examples.
    """

    training = False  # per-example Jacobians of every layer: far too costly every N steps
    flag_off_names = {"pixel_space": "--normalized-space"}

    def draw(self, source, options, seed: int) -> list:
        x, y = source.split()
        idx = sample_indices(x.shape[0], min(options["examples"], x.shape[0]), seed)
        return [(x[idx].to(source.device), y[idx].to(source.device))]

    def prepare(self, ctx: ProbeContext) -> dict:
        model, names = ctx.model, parse_layers(ctx.options["layers"])
        if names is not None and isinstance(model, GradlabNet):  # unknown layer: fail now
            units = [f"blocks.{i}" for i in range(len(model.blocks))] + ["head"]
            select_layers([(i, n, None) for i, n in enumerate(units)], names)
        if ctx.source is not None and ctx.source.fresh:
            x = ctx.source.data.x_train
            idx = sample_indices(x.shape[0], min(RECALIBRATION_EXAMPLES, x.shape[0]), ctx.seed)
            if recalibrate_batchnorm(model, x[idx].to(ctx.device)):
                ctx.notes.append(
                    f"fresh model: BatchNorm running statistics set from {len(idx)} training examples, "
                    "so eval mode normalises as training would")
        return {}

    def run(self, ctx: ProbeContext) -> ProbeReport:
        from gradlab.probes.spectra_plots import depth_figure, spectra_figure

        o, t = ctx.options, ctx.options["threshold"]
        x, dist = ctx.batches[0][0], ctx.dist
        split = dist is not None and dist.enabled and x.shape[0] >= dist.world_size
        mine = torch.tensor_split(x, dist.world_size)[dist.rank] if split else x  # examples in order
        rep = jacobian_probe(ctx.model, mine, pixel_space=o["pixel_space"], per_layer=o["per_layer"],
                             layers=parse_layers(o["layers"]), method=o["method"], k=o["k"],
                             max_dense=o["max_dense"] * mine.shape[0] / x.shape[0], seed=ctx.seed)
        if split:
            rep = _gathered(rep, dist)
        spectra, summary = rep.to_frames()
        metrics = rep.metrics(t)
        lines = report_lines(rep, summary, metrics, t)
        figures = {"jacobian_spectra": spectra_figure(rep)}
        if summary["depth"].notna().any():
            figures["jacobian_depth"] = depth_figure(rep)
        io = summary.iloc[0]
        keys = ("mean_sq_sv", "var_sq_sv", "max_sv", "min_sv", "condition_number", "frac_near_one")
        series: dict = {}
        for row in summary[summary["depth"].notna()].itertuples(index=False):
            for key in ("max_sv", "mean_sq_sv", "min_sv", "cum_spectral_norm"):
                value = getattr(row, key)
                if value == value:  # NaN (Lanczos mode) is left out rather than drawn as a gap
                    series.setdefault(f"jacobian_depth/{key}", []).append((int(row.depth), value))
        histograms = {}
        for ls in rep.layers:
            sv = ls.singular_values.flatten()
            if bool((sv > 0).any()):
                histograms[f"jacobian_log10_sv/{ls.name}"] = torch.log10(sv[sv > 0])
        title = ""
        if ctx.source is not None:
            title = (f"Jacobian spectra: {ctx.source.where}, {rep.n_examples} {ctx.source.split_name} examples, "
                     f"{rep.space} input (statistics averaged over examples)")
        return ProbeReport(
            table=spectra, tables={"jacobian_summary": summary}, view=summary[TABLE_COLUMNS], title=title,
            scalars={k: io[k] for k in keys if io[k] == io[k]}, scalar_group="jacobian_io", series=series,
            histograms=histograms, figures=figures, summary_lines=lines, notes=list(rep.notes),
            text={"jacobian/report": "\n\n".join(lines)},
            metrics={**metrics, "space": rep.space, "n_examples": rep.n_examples},
        )


def _gathered(rep: JacobianReport, dist) -> JacobianReport:
    """Under torchrun: every rank's examples (contiguous, in rank order) in one report. ``auto``
    picks the same path as one process (``max_dense`` scaled by the rank's share); the dense path
    equals one process, Lanczos draws its start vectors from the same seed on every rank."""
    from dataclasses import replace

    from gradlab.core.distributed import gather_objects

    def plain(ls):
        return {f: (None if getattr(ls, f) is None else getattr(ls, f).cpu()) for f in _PER_EXAMPLE} | {
            "converged": ls.converged, "iterations": ls.iterations}

    parts = gather_objects([plain(ls) for ls in rep.layers], dist)
    layers = []
    for j, ls in enumerate(rep.layers):
        mine = [p[j] for p in parts]
        cat = {f: None if mine[0][f] is None else torch.cat([m[f] for m in mine]) for f in _PER_EXAMPLE}
        layers.append(replace(ls, **cat, converged=all(m["converged"] for m in mine),
                              iterations=max(m["iterations"] for m in mine)))
    out = JacobianReport(layers, rep.space, sum(p[0]["singular_values"].shape[0] for p in parts), rep.notes)
    out.hidden_span = rep.hidden_span
    return out


_PER_EXAMPLE = ("singular_values", "spectral_radius", "moments", "jacobian", "log_abs_det", "trace_minus_n")


def report_lines(rep: JacobianReport, summary, metrics: dict, t: float) -> list[str]:
    """The input-output and hidden-to-hidden statistics (each naming its map and shape), the verdict
    with the maps it rests on, and a Lanczos convergence warning, as sentences."""
    io = summary.iloc[0]
    inp = "input pixels" if rep.space == "pixel" else "normalized input"
    lines = [
        f"input-output map ({int(io['out_dim'])}x{int(io['in_dim'])}: logits per {inp}): "
        + _stat_text(io)
    ]
    hidden = summary[summary["layer"] == HIDDEN]
    if len(hidden) and rep.hidden_span is not None:
        hh, (a, b) = hidden.iloc[0], rep.hidden_span
        lines.append(
            f"hidden-to-hidden map ({int(hh['out_dim'])}x{int(hh['in_dim'])}: blocks.{a}..blocks.{b - 1}, the product "
            f"Pennington et al. 2017 study): " + _stat_text(hh)
            + (f", spectral radius {hh['spectral_radius']:.4g}" if hh["spectral_radius"] == hh["spectral_radius"] else "")
        )
    if "verdict" in metrics:
        lines.append(
            f"verdict: {metrics['verdict']}: typical gain x{metrics['gain_rate']:.3g} per layer (geometric mean of the "
            f"rms singular values of {metrics['verdict_basis']}: {metrics['verdict_layers']}; threshold t={t:g}: "
            f"vanishing below {1 / (1 + t):.3g}, exploding above {1 + t:.3g}); product of spectral norms over depth "
            f"{metrics['cum_spectral_norm']:.4g}"
        )
    if not summary["converged"].all():
        bad = ", ".join(summary.loc[~summary["converged"], "layer"])
        lines.append(f"warning: Lanczos did not converge for {bad}; their top singular values are estimates")
    return lines
