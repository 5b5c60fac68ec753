"""``gradlab probe gradnorm``: per-layer gradient and backward-signal norms, with a verdict.

The model-source options it shares with the other probes live in :mod:`gradlab_cli._source`.
"""

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
    finish_and_print,
    render_table,
    resolve_options,
    start_run,
)

from gradlab_cli._source import (
    ActOpt,
    DataDirOpt,
    DatasetOpt,
    DepthOpt,
    InitOpt,
    LayersOpt,
    load_source,
    ModelOpt,
    NormOpt,
    parse_layers,
    PROBE,
    ResidualOpt,
    sample_indices,
    SigmaBOpt,
    SigmaWOpt,
    SOURCE_DEFAULTS,
    split_tensors,
    SplitOpt,
    WidthOpt,
)

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
    batches: Annotated[Optional[int], typer.Option(help="Batches to average over (>= 1); the spread across them is grad_norm_std. (default: 4)", rich_help_panel=PROBE)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Examples per batch. (default: 128)", rich_help_panel=PROBE)] = None,
    split: SplitOpt = None,
    layers: LayersOpt = None,
    threshold: Annotated[Optional[float], typer.Option(help="Verdict threshold t: the signal norm's fitted growth factor per layer (towards the input) below 1/(1+t) is 'vanishing', above 1+t 'exploding', else 'stable'. (default: 0.1)", rich_help_panel=PROBE)] = None,
    train_mode: Annotated[Optional[bool], typer.Option("--train-mode/--eval-mode", help="Run the model in training mode (BatchNorm batch statistics, dropout on: what the optimiser sees) or eval mode; the model is restored either way. (default: train mode)", rich_help_panel=PROBE)] = None,
    run: RunRefOpt = None,
    runs_dir: RunsDirOpt = None,
    name: NameOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Per-layer gradient norm, weight norm, their ratio and the backward signal norm ||dL/dh|| (per example).

    Verdict: a least-squares fit of log(signal norm) against depth gives the factor by which the backward signal is multiplied per layer on its way to the input; below 1/(1+t) it is 'vanishing', above 1+t 'exploding', else 'stable' (t = --threshold, default 0.1, i.e. 10% per layer).

    Writes gradnorm.csv, TensorBoard scalars (x axis = depth) and histograms, and plots/gradnorm.png.
    """
    from gradlab.core.errors import GradlabError

    flags = dict(
        model=model, dataset=dataset, data_dir=data_dir, depth=depth, width=width, act=act, init=init,
        sigma_w=sigma_w, sigma_b=sigma_b, residual=residual, norm=norm, batches=batches, batch_size=batch_size,
        split=split, layers=layers, threshold=threshold, train_mode=train_mode, run=run, runs_dir=runs_dir,
        name=name, seed=seed, device=device,
    )
    defaults = {**SOURCE_DEFAULTS, "batches": 4, "batch_size": 128, "threshold": 0.1, "train_mode": True}
    cfg = resolve_options(defaults, config, flags)
    for key in ("batches", "batch_size"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise GradlabError(f"invalid {key.replace('_', '-')}: {cfg[key]!r} (must be an integer >= 1)")
    if not isinstance(cfg["threshold"], (int, float)) or cfg["threshold"] <= 0:
        raise GradlabError(f"invalid threshold: {cfg['threshold']!r} (must be > 0)")
    layer_names = parse_layers(cfg["layers"])

    import torch.nn.functional as F

    from gradlab.probes.gradnorm import gradnorm_probe, probe_layers, select_layers
    from gradlab.probes.spectra_plots import gradnorm_figure

    net, data, dev, desc = load_source(cfg)
    select_layers(probe_layers(net), layer_names)  # unknown layer: fail before a folder exists
    x_all, y_all = split_tensors(data, cfg["split"])
    bs = min(cfg["batch_size"], x_all.shape[0])
    idx = sample_indices(x_all.shape[0], cfg["batches"] * bs, cfg["seed"]).view(cfg["batches"], bs)
    batch_list = [(x_all[i].to(dev), y_all[i].to(dev)) for i in idx]

    run_dir = start_run("probe-gradnorm", {**cfg, **desc})
    with run_dir:
        rep = gradnorm_probe(net, F.cross_entropy, batch_list, layers=layer_names,
                             threshold=float(cfg["threshold"]), train_mode=bool(cfg["train_mode"]))
        df = rep.to_frame()
        run_dir.write_csv("gradnorm.csv", df)
        tb = run_dir.tb
        for lg in rep.layers:  # scalars against depth: TensorBoard's step axis is the layer index
            for key in ("grad_norm", "weight_norm", "ratio", "signal_norm"):
                tb.add_scalar(f"gradnorm/{key}", getattr(lg, key), lg.layer)
            tb.add_histogram(f"signal_norm_per_example/{lg.name}", lg.signal_norm_per_example, 0)
        run_dir.log_metrics(0, None, "gradnorm", {"signal_rate": rep.rate, "loss": rep.loss})
        run_dir.save_figure(gradnorm_figure(rep), "gradnorm")
        line = verdict_line(rep)
        run_dir.log_text("gradnorm/verdict", line)
        if not quiet:
            where = desc["source_run"] or f"fresh {desc['model']} on {desc['dataset']} (seed {cfg['seed']})"
            render_table(df, title=f"gradient norms: {where}, {rep.n_batches} batches x {bs} ({cfg['split']} split)")
        console.print(line, highlight=False)
        finish_and_print(run_dir, "completed", {**rep.metrics(), **desc})


def verdict_line(rep) -> str:
    t = rep.threshold
    if rep.verdict == "undetermined":
        return "verdict: undetermined (a growth rate needs at least two layers)"
    return (f"verdict: {rep.verdict}: backward signal norm x{rep.rate:.3g} per layer towards the input "
            f"(log-linear fit over {len(rep.layers)} layers; threshold t={t:g}: vanishing below "
            f"{1 / (1 + t):.3g}, exploding above {1 + t:.3g})")
