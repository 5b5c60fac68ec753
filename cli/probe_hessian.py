"""``gradlab probe hessian``: top/bottom eigenvalues, trace, spectral density, 2/lambda_max, point type."""

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
    ModelOpt,
    NormOpt,
    ResidualOpt,
    SigmaBOpt,
    SigmaWOpt,
    SOURCE_DEFAULTS,
    SplitOpt,
    WidthOpt,
)

PROBE = "Hessian probe"
#: The probe's trace methods (gradlab.curvature.gauss_newton.TRACE_METHODS; spelled out here so
#: that --help does not import torch, and a test keeps the two equal).
TRACE_METHOD_NAMES = ("auto", "gauss-newton", "xtrace", "krylov", "hutch++", "hutchinson")

DEFAULTS = {**SOURCE_DEFAULTS, "top_k": 5, "bottom_k": 1, "trace": True, "density": False, "batches": "4",
            "batch_size": 512, "tol": 1e-3, "backend": "auto", "mode": "eval", "trace_method": "auto",
            "trace_matvecs": 60, "lr": None, "grad_tol": 1e-3, "exact": False, "dense_max": 5000}
SGD_LIKE = ("sgd", "momentum", "nesterov", "gd", "curvature-gd", "langevin")


def parse_batches(value) -> Optional[int]:
    """``--batches``: a count >= 1, or 0 / "all" for the whole split (returned as None)."""
    from gradlab.core.errors import GradlabError

    text = str(value).strip().lower()
    if text in ("all", "0"):
        return None
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 1:
        raise GradlabError(f"invalid batches: {value!r} (an integer >= 1, or 0 / 'all' for the whole split)")
    return n


def density_figure(rep):
    """Log-scale SLQ density with the computed extreme eigenvalues marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = rep.density
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.semilogy(d.grid.numpy(), d.density.clamp_min(1e-12).numpy(), lw=1.2, label="SLQ density")
    for i, v in enumerate(rep.top + rep.bottom):
        ax.axvline(v, color="tab:red", lw=0.6, alpha=0.6, label="computed eigenvalues" if i == 0 else None)
    ax.set_ylim(bottom=max(1e-8, float(d.density.max()) * 1e-7))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    ax.set_title(f"Hessian spectral density ({d.weights.shape[0]} starts x {d.weights.shape[1]} Lanczos steps, sigma={d.sigma:.2g})")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


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
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Number of largest eigenvalues (>= 1). (default: 5)", rich_help_panel=PROBE)] = None,
    bottom_k: Annotated[Optional[int], typer.Option("--bottom-k", help="Number of smallest eigenvalues (>= 0; >= 1 is needed to tell a minimum from a saddle). (default: 1)", rich_help_panel=PROBE)] = None,
    trace: Annotated[Optional[bool], typer.Option("--trace/--no-trace", help="Estimate the trace with a standard error. (default: --trace)", rich_help_panel=PROBE)] = None,
    density: Annotated[Optional[bool], typer.Option("--density/--no-density", help="Spectral density by stochastic Lanczos quadrature (plot + density rows). (default: --no-density)", rich_help_panel=PROBE)] = None,
    batches: Annotated[Optional[str], typer.Option(help="Batches of --batch-size to average the loss over; 0 or 'all' = the whole split. (default: 4)", rich_help_panel=PROBE)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Examples per batch. (default: 512)", rich_help_panel=PROBE)] = None,
    split: SplitOpt = None,
    tol: Annotated[Optional[float], typer.Option(help="Eigen-solver relative residual tolerance (> 0). (default: 1e-3)", rich_help_panel=PROBE)] = None,
    backend: Annotated[Optional[str], typer.Option(help="HVP backend: auto, double-backward, func. (default: auto = double-backward)", rich_help_panel=PROBE)] = None,
    mode: Annotated[Optional[str], typer.Option(help="Model mode for the products: eval (dropout off, BatchNorm running stats) or train (batch stats, fixed dropout masks); the model is restored. (default: eval)", rich_help_panel=PROBE)] = None,
    trace_method: Annotated[Optional[str], typer.Option(help="Trace method: auto (gauss-newton where the layers allow, else xtrace), gauss-newton (exact for ReLU-type nets), xtrace, krylov, hutch++, hutchinson. (default: auto)", rich_help_panel=PROBE)] = None,
    trace_matvecs: Annotated[Optional[int], typer.Option(help="Budget for the trace: Hessian-vector products, or gauss-newton residual samples (about one HVP each). (default: 60)", rich_help_panel=PROBE)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate to compare with 2/lambda_max. (default: the --run's lr)", rich_help_panel=PROBE)] = None,
    grad_tol: Annotated[Optional[float], typer.Option(help="Gradient norm above which the point is 'not a critical point'. (default: 1e-3)", rich_help_panel=PROBE)] = None,
    exact: Annotated[Optional[bool], typer.Option("--exact/--no-exact", help="Eigenvalues and trace from the dense Hessian (small models only, see --dense-max). (default: --no-exact)", rich_help_panel=PROBE)] = None,
    dense_max: Annotated[Optional[int], typer.Option(help="Largest parameter count for --exact (the dense Hessian needs n^2 memory and n products). (default: 5000)", rich_help_panel=PROBE)] = None,
    run: RunRefOpt = None,
    runs_dir: RunsDirOpt = None,
    name: NameOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Hessian of the training loss: top-k/bottom-k eigenvalues, trace, density, stability bound.

    Compares the gradient-descent stability bound 2/lambda_max with the learning rate (the run's, or --lr).

    Classifies the point: minimum, saddle, maximum, degenerate, or not a critical point (gradient norm above --grad-tol).

    Writes hessian.csv (kind,index,value,stderr) and TensorBoard scalars; with --density also plots/hessian_density.png (logged as a TensorBoard image) and hessian_density.csv.
    """
    from gradlab.core.errors import GradlabError

    flags = dict(
        model=model, dataset=dataset, data_dir=data_dir, depth=depth, width=width, act=act, init=init,
        sigma_w=sigma_w, sigma_b=sigma_b, residual=residual, norm=norm, top_k=top_k, bottom_k=bottom_k,
        trace=trace, density=density, batches=batches, batch_size=batch_size, split=split, tol=tol,
        backend=backend, mode=mode, trace_method=trace_method, trace_matvecs=trace_matvecs, lr=lr,
        grad_tol=grad_tol, exact=exact, dense_max=dense_max, run=run, runs_dir=runs_dir, name=name, seed=seed, device=device,
    )
    cfg = resolve_options(DEFAULTS, config, flags)
    # validate everything before a run folder exists
    for key, low in (("top_k", 1), ("bottom_k", 0), ("batch_size", 1), ("trace_matvecs", 4), ("dense_max", 1)):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < low:
            raise GradlabError(f"invalid {key.replace('_', '-')}: {cfg[key]!r} (must be an integer >= {low})")
    for key in ("tol", "grad_tol", "lr"):
        if cfg[key] is not None and (not isinstance(cfg[key], (int, float)) or cfg[key] <= 0):
            raise GradlabError(f"invalid {key.replace('_', '-')}: {cfg[key]!r} (must be > 0)")
    choices = {"backend": ("auto", "double-backward", "func"), "mode": ("eval", "train"),
               "trace_method": tuple(TRACE_METHOD_NAMES)}
    for key, valid in choices.items():
        if cfg[key] not in valid:
            raise GradlabError(f"unknown {key.replace('_', '-')} {cfg[key]!r}; choose from: {', '.join(valid)}")
    num_batches = parse_batches(cfg["batches"])

    from gradlab.probes.hessian import as_batches, hessian_probe
    from gradlab.runs.records import find_run, read_config
    from gradlab_cli._source import load_source, split_tensors

    net, data, dev, desc = load_source(cfg)
    run_cfg = {}
    if cfg["run"] is not None:
        run_cfg = read_config(find_run(cfg["runs_dir"], cfg["run"], require_checkpoint=True)).get("config", {})
    lr_used = cfg["lr"] if cfg["lr"] is not None else run_cfg.get("lr")
    x_all, y_all = split_tensors(data, cfg["split"])
    batch_list = [(x.to(dev), y.to(dev)) for x, y in as_batches(x_all, y_all, cfg["batch_size"], num_batches)]
    n_params = sum(p.numel() for p in net.parameters() if p.requires_grad)
    if cfg["top_k"] > n_params or cfg["bottom_k"] > n_params:
        raise GradlabError(f"invalid top-k/bottom-k: the model has only {n_params} parameters")
    if cfg["exact"] and n_params > cfg["dense_max"]:
        raise GradlabError(f"--exact: model too large for the dense Hessian ({n_params} parameters > "
                           f"--dense-max {cfg['dense_max']}); drop --exact to use the HVP solvers")

    run_dir = start_run("probe-hessian", {**cfg, **desc, "lr_compared": lr_used})
    with run_dir:
        rep = hessian_probe(
            net, batch_list, top_k=cfg["top_k"], bottom_k=cfg["bottom_k"], trace=bool(cfg["trace"]),
            density=bool(cfg["density"]), tol=float(cfg["tol"]), lr=lr_used,
            backend=None if cfg["backend"] == "auto" else cfg["backend"], mode=cfg["mode"],
            trace_method=cfg["trace_method"], trace_matvecs=cfg["trace_matvecs"],
            grad_tol=float(cfg["grad_tol"]), exact=bool(cfg["exact"]), dense_max=cfg["dense_max"], seed=cfg["seed"],
        )
        df = rep.to_frame()
        run_dir.write_csv("hessian.csv", df)
        metrics = rep.metrics()
        run_dir.log_metrics(0, None, "hessian", metrics)
        for i, v in enumerate(rep.top):  # eigenvalues against their rank: step axis = index
            run_dir.tb.add_scalar("hessian/top_eigenvalue", v, i + 1)
        for i, v in enumerate(rep.bottom):
            run_dir.tb.add_scalar("hessian/bottom_eigenvalue", v, i + 1)
        if rep.density is not None:
            run_dir.write_csv("hessian_density.csv", rep.density_frame())
            run_dir.save_figure(density_figure(rep), "hessian_density")
        lines = summary_lines(rep, run_cfg.get("opt"))
        run_dir.log_text("hessian/summary", "\n\n".join(lines))
        if not quiet:
            where = desc["source_run"] or f"fresh {desc['model']} on {desc['dataset']} (seed {cfg['seed']})"
            render_table(overview_frame(rep), title=f"Hessian: {where}, {rep.num_samples} {cfg['split']} examples, "
                         f"{rep.num_params} parameters, mode={rep.mode}, backend={rep.backend}")
        for line in lines:
            console.print(line, highlight=False)
        finish_and_print(run_dir, "completed", {**metrics, "classification": rep.classification.kind, **desc})


def overview_frame(rep):
    """The rich table: one row per quantity (the full long table is hessian.csv)."""
    import pandas as pd

    rows = [(f"lambda_{i + 1} (top)", v, None) for i, v in enumerate(rep.top)]
    rows += [(f"lambda_min{'' if i == 0 else f'+{i}'} (bottom)", v, None) for i, v in enumerate(rep.bottom)]
    if rep.trace is not None:
        rows.append((f"trace ({rep.trace_method})", rep.trace, rep.trace_stderr))
    rows += [("gradient norm", rep.grad_norm, None), ("loss", rep.loss, None),
             ("stability bound 2/lambda_max", rep.stability_bound, None)]
    if rep.lr is not None:
        rows.append(("learning rate", rep.lr, None))
    rows.append(("Hessian-vector products", float(rep.num_matvecs), None))
    return pd.DataFrame(rows, columns=["quantity", "value", "stderr"]).astype({"stderr": float})


def summary_lines(rep, opt: Optional[str]) -> list:
    lines = [f"point: {rep.classification.line()}"]
    bound = rep.stability_bound
    if rep.lr is None:
        lines.append(f"stability: gradient descent is stable on this quadratic model for lr < 2/lambda_max = {bound:.4g}")
    elif rep.lr_above_bound:
        lines.append(f"WARNING: lr {rep.lr:g} is ABOVE the gradient-descent stability bound 2/lambda_max = {bound:.4g} "
                     f"(x{rep.lr / bound:.3g}): plain GD would diverge along the top eigenvector here "
                     f"(or sit at the edge of stability)")
    else:
        lines.append(f"stability: lr {rep.lr:g} is below the bound 2/lambda_max = {bound:.4g} (x{rep.lr / bound:.3g})")
    if rep.lr is not None and opt is not None and opt not in SGD_LIKE:
        lines.append(f"note: the run used --opt {opt}; 2/lambda_max bounds plain (S)GD steps, an adaptive "
                     f"optimizer's effective step differs per coordinate")
    lines += [f"note: {n}" for n in rep.notes]
    return lines
