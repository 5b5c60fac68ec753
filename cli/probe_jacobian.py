"""``gradlab probe jacobian``: per-example input-output and per-layer Jacobian spectra."""

from __future__ import annotations

from typing import Optional

import typer
from typing_extensions import Annotated

from gradlab_cli._common import (
    ConfigOpt,
    DeviceOpt,
    NameOpt,
    QuietOpt,
    RunRefOpt,
    RunsDirOpt,
    SeedOpt,
    console,
    err_console,
    finish_and_print,
    render_table,
    resolve_options,
    start_run,
)
from gradlab_cli._source import (
    PROBE,
    SOURCE_DEFAULTS,
    ActOpt,
    DataDirOpt,
    DatasetOpt,
    DepthOpt,
    InitOpt,
    LayersOpt,
    ModelOpt,
    NormOpt,
    ResidualOpt,
    SigmaBOpt,
    SigmaWOpt,
    SplitOpt,
    WidthOpt,
    load_source,
    parse_layers,
    sample_indices,
    split_tensors,
)

TABLE_COLUMNS = ["layer", "method", "n_sv", "mean_sq_sv", "var_sq_sv", "max_sv", "min_sv",
                 "condition_number", "frac_near_one", "spectral_radius", "cum_spectral_norm"]


def command(
    model: ModelOpt = None,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    depth: DepthOpt = None,
    width: WidthOpt = None,
    act: ActOpt = None,
    init: InitOpt = None,
    sigma_w: SigmaWOpt = None,
    sigma_b: SigmaBOpt = None,
    residual: ResidualOpt = None,
    norm: NormOpt = None,
    examples: Annotated[Optional[int], typer.Option(help="Examples whose Jacobians are taken, one by one (>= 1). (default: 32)", rich_help_panel=PROBE)] = None,
    split: SplitOpt = None,
    layers: LayersOpt = None,
    pixel_space: Annotated[Optional[bool], typer.Option("--pixel-space/--normalized-space", help="Differentiate w.r.t. the raw [0, 1] pixels instead of the input after the model's fixed normalisation layer. (default: normalised)", rich_help_panel=PROBE)] = None,
    per_layer: Annotated[Optional[bool], typer.Option("--per-layer/--no-per-layer", help="Also take every block's (and the head's) own Jacobian. (default: on)", rich_help_panel=PROBE)] = None,
    method: Annotated[Optional[str], typer.Option(help="auto, dense (all singular values: vmap over jacrev/jacfwd) or lanczos (top k by Lanczos on J^T J with JVP/VJP products). auto = dense while examples x outputs x inputs <= --max-dense. (default: auto)", rich_help_panel=PROBE)] = None,
    k: Annotated[Optional[int], typer.Option("--k", help="Top singular values computed per map by Lanczos. (default: 8)", rich_help_panel=PROBE)] = None,
    max_dense: Annotated[Optional[int], typer.Option(help="Largest examples x outputs x inputs that auto computes densely. (default: 16777216)", rich_help_panel=PROBE)] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Verdict threshold t on the typical gain per layer (geometric mean over layers of the rms singular value): below 1/(1+t) 'vanishing', above 1+t 'exploding', else 'stable'. (default: 0.1)", rich_help_panel=PROBE)] = None,
    run: RunRefOpt = None,
    runs_dir: RunsDirOpt = None,
    name: NameOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Jacobian singular values per example and dynamical-isometry statistics, end to end and per layer.

    Statistics (Saxe et al. 2014, Pennington et al. 2017), per example then averaged: mean and variance of the squared singular values, max (spectral norm) and min singular value, condition number, fraction within 10% of 1; per layer also the spectral radius (square maps) and the cumulative product of spectral norms over depth. Verdict: the geometric mean over layers of each layer's rms singular value; below 1/(1+t) 'vanishing', above 1+t 'exploding' (t = --threshold).

    Writes jacobian.csv (layer,example,index,singular_value), jacobian_summary.csv (one row per map), TensorBoard histograms of log10 singular values and per-layer statistics against depth, plots/jacobian_spectra.png and plots/jacobian_depth.png. The model runs in eval mode.
    """
    from gradlab.core.errors import GradlabError
    from gradlab.probes.jacobian import METHODS

    flags = dict(
        model=model, dataset=dataset, data_dir=data_dir, depth=depth, width=width, act=act, init=init,
        sigma_w=sigma_w, sigma_b=sigma_b, residual=residual, norm=norm, examples=examples, split=split,
        layers=layers, pixel_space=pixel_space, per_layer=per_layer, method=method, k=k, max_dense=max_dense,
        threshold=threshold, run=run, runs_dir=runs_dir, name=name, seed=seed, device=device,
    )
    defaults = {**SOURCE_DEFAULTS, "examples": 32, "pixel_space": False, "per_layer": True, "method": "auto",
                "k": 8, "max_dense": 2**24, "threshold": 0.1}
    cfg = resolve_options(defaults, config, flags)
    for key in ("examples", "k", "max_dense"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise GradlabError(f"invalid {key.replace('_', '-')}: {cfg[key]!r} (must be an integer >= 1)")
    if cfg["method"] not in METHODS:
        raise GradlabError(f"unknown method {cfg['method']!r}; choose from: {', '.join(METHODS)}")
    if not isinstance(cfg["threshold"], (int, float)) or cfg["threshold"] <= 0:
        raise GradlabError(f"invalid threshold: {cfg['threshold']!r} (must be > 0)")
    layer_names = parse_layers(cfg["layers"])

    from gradlab.models.base import GradlabNet
    from gradlab.probes.gradnorm import select_layers
    from gradlab.probes.jacobian import jacobian_probe
    from gradlab.probes.spectra_plots import depth_figure, spectra_figure

    net, data, dev, desc = load_source(cfg)
    if layer_names is not None and isinstance(net, GradlabNet):  # fail before a folder exists
        names = [f"blocks.{i}" for i in range(len(net.blocks))] + ["head"]
        select_layers([(i, n, None) for i, n in enumerate(names)], layer_names)
    x_all, _ = split_tensors(data, cfg["split"])
    x = x_all[sample_indices(x_all.shape[0], min(cfg["examples"], x_all.shape[0]), cfg["seed"])].to(dev)
    if not desc["source_run"] and _recalibrate_batchnorm(net, data.x_train, dev, cfg["seed"]):
        err_console.print("gradlab: note: fresh model: BatchNorm running statistics set from 256 training "
                          "examples, so eval mode normalises as training would", highlight=False)

    run_dir = start_run("probe-jacobian", {**cfg, **desc})
    with run_dir:
        rep = jacobian_probe(net, x, pixel_space=bool(cfg["pixel_space"]), per_layer=bool(cfg["per_layer"]),
                             layers=layer_names, method=cfg["method"], k=cfg["k"], max_dense=cfg["max_dense"],
                             seed=cfg["seed"])
        spectra, summary = rep.to_frames()
        run_dir.write_csv("jacobian.csv", spectra)
        run_dir.write_csv("jacobian_summary.csv", summary)
        _log_tensorboard(run_dir, rep, summary)
        run_dir.save_figure(spectra_figure(rep), "jacobian_spectra")
        if summary["depth"].notna().any():
            run_dir.save_figure(depth_figure(rep), "jacobian_depth")
        metrics = rep.metrics(float(cfg["threshold"]))
        lines = _report_lines(rep, summary, metrics, float(cfg["threshold"]))
        run_dir.log_text("jacobian/report", "\n\n".join(lines))
        for note in rep.notes:
            err_console.print(f"gradlab: note: {note}", highlight=False)
        if not quiet:
            where = desc["source_run"] or f"fresh {desc['model']} on {desc['dataset']} (seed {cfg['seed']})"
            render_table(summary[TABLE_COLUMNS], title=f"Jacobian spectra: {where}, {rep.n_examples} "
                         f"{cfg['split']} examples, {rep.space} input (statistics averaged over examples)")
        for line in lines:
            console.print(line, highlight=False)
        finish_and_print(run_dir, "completed", {**metrics, "space": rep.space, "n_examples": rep.n_examples, **desc})


def _recalibrate_batchnorm(net, x_train, dev, seed: int) -> bool:
    """Give a fresh model's BatchNorm layers the running statistics of a data batch.

    At initialisation the running statistics are (0, 1), so eval mode (which per-example
    Jacobians need) would make BatchNorm the identity; one cumulative pass over 256 training
    examples makes it normalise as in training. Returns whether the model had BatchNorm.
    """
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    bns = [m for m in net.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return False
    flags = [(m, m.training) for m in net.modules()]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over this pass
    net.train()
    with torch.no_grad():
        net(x_train[sample_indices(x_train.shape[0], min(256, x_train.shape[0]), seed)].to(dev))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    for m, flag in flags:
        m.training = flag
    return True


def _log_tensorboard(run_dir, rep, summary) -> None:
    """Histograms of log10 singular values per map; per-layer statistics with depth as the step."""
    import torch

    tb = run_dir.tb
    for ls in rep.layers:
        sv = ls.singular_values.flatten()
        sv = sv[sv > 0]
        if sv.numel():
            tb.add_histogram(f"jacobian_log10_sv/{ls.name}", torch.log10(sv), 0)
    for row in summary[summary["depth"].notna()].itertuples(index=False):
        for key in ("max_sv", "mean_sq_sv", "min_sv", "cum_spectral_norm"):
            value = getattr(row, key)
            if value == value:  # NaN (Lanczos mode) is left out rather than drawn as a gap
                tb.add_scalar(f"jacobian_depth/{key}", value, int(row.depth))
    io = summary.iloc[0]
    run_dir.log_metrics(0, None, "jacobian_io", {k: io[k] for k in ("mean_sq_sv", "var_sq_sv", "max_sv", "min_sv",
                                                                      "condition_number", "frac_near_one")
                                                   if io[k] == io[k]})


def _report_lines(rep, summary, metrics: dict, t: float) -> list[str]:
    io = summary.iloc[0]
    lines = [
        f"input-output ({rep.space} input): mean squared singular value {io['mean_sq_sv']:.4g}, variance "
        f"{io['var_sq_sv']:.4g}, max {io['max_sv']:.4g}, min {io['min_sv']:.4g}, condition number "
        f"{io['condition_number']:.4g}, within 10% of 1: {io['frac_near_one']:.1%}"
    ]
    if "verdict" in metrics:
        lines.append(
            f"verdict: {metrics['verdict']}: typical gain x{metrics['gain_rate']:.3g} per layer (geometric mean of "
            f"per-layer rms singular values; threshold t={t:g}: vanishing below {1 / (1 + t):.3g}, exploding above "
            f"{1 + t:.3g}); product of spectral norms over depth {metrics['cum_spectral_norm']:.4g}"
        )
    if not summary["converged"].all():
        bad = ", ".join(summary.loc[~summary["converged"], "layer"])
        lines.append(f"warning: Lanczos did not converge for {bad}; their top singular values are estimates")
    return lines
