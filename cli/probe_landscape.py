"""``gradlab probe landscape``: loss and accuracy on a 1-D line or 2-D plane around a trained run."""

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
    parse_float_list,
    render_table,
    resolve_options,
    start_run,
)

PANEL = "Landscape"
DEFAULTS = {
    "run": None, "dims": 2, "steps": 25, "range": None, "directions": "random", "to": None, "batches": None,
    "batch_size": 512, "split": "train", "include_bn": False, "log_scale": False, "plane_vertices": None,
    "points_per_call": 1, "lambda_max": False,
}


def command(
    dims: Annotated[Optional[int], typer.Option(help="1 (a line) or 2 (a plane). (default: 2)", rich_help_panel=PANEL)] = None,
    steps: Annotated[Optional[int], typer.Option(help="Grid points per axis, >= 2; odd puts the weights exactly on the grid. (default: 25)", rich_help_panel=PANEL)] = None,
    range_: Annotated[Optional[str], typer.Option("--range", help="Coordinate range lo,hi on every axis. (default: -1,1; interp -1.5,0.5 or -0.5,1.5; pca and --plane-vertices: fitted to the trajectory/vertices)", rich_help_panel=PANEL)] = None,
    directions: Annotated[Optional[str], typer.Option(help="random (filter-normalised Gaussian), pca (training trajectory), eigen (top Hessian eigenvectors) or interp (straight line to init or --to). (default: random)", rich_help_panel=PANEL)] = None,
    to: Annotated[Optional[str], typer.Option("--to", help="interp: the other end, a second run (RUN_B). (default: this run's initial weights)", rich_help_panel=PANEL)] = None,
    batches: Annotated[Optional[int], typer.Option(help="Evaluate on the first N batches. (default: the whole split)", rich_help_panel=PANEL)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Examples per batch. (default: 512)", rich_help_panel=PANEL)] = None,
    split: Annotated[Optional[str], typer.Option(help="train or test. (default: train)", rich_help_panel=PANEL)] = None,
    include_bn: Annotated[Optional[bool], typer.Option("--include-bn", help="random: also move biases and BatchNorm parameters (default: they stay put, as in Li et al.).", rich_help_panel=PANEL)] = None,
    log_scale: Annotated[Optional[bool], typer.Option("--log-scale", help="Plot log10 of the loss.", rich_help_panel=PANEL)] = None,
    plane_vertices: Annotated[Optional[str], typer.Option(help="i,j,k: draw the plane through three vertices of the simplex saved by `gradlab simplex` (--run is the simplex run).", rich_help_panel=PANEL)] = None,
    points_per_call: Annotated[Optional[int], typer.Option(help="Grid points per vmapped call (faster on a GPU; 1 is fastest on a CPU). (default: 1)", rich_help_panel=PANEL)] = None,
    lambda_max: Annotated[Optional[bool], typer.Option("--lambda-max", help="Also report the Hessian's largest eigenvalue at the weights (Lanczos, first 4 batches).", rich_help_panel=PANEL)] = None,
    run: RunRefOpt = None,
    runs_dir: RunsDirOpt = None,
    name: NameOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Loss landscape of a trained run: landscape.csv (x,y,loss,acc), contour and 3-D surface plots,
    directions.pt. The grid is centred on the run's weights and leaves the model untouched."""
    import time

    import torch

    from gradlab.core.device import resolve_device
    from gradlab.core.errors import GradlabError
    from gradlab.landscape import plots
    from gradlab.landscape.grid import make_axes, make_batches
    from gradlab.landscape.probe import DIRECTIONS, choose_directions, landscape, simplex_plane
    from gradlab.runs import find_run, load_checkpoint, read_config, save_checkpoint
    from gradlab.training.load import load_run

    flags = dict(run=run, dims=dims, steps=steps, range=range_, directions=directions, to=to, batches=batches,
                 batch_size=batch_size, split=split, include_bn=include_bn, log_scale=log_scale,
                 plane_vertices=plane_vertices, points_per_call=points_per_call, lambda_max=lambda_max, runs_dir=runs_dir, name=name,
                 seed=seed, device=device)
    cfg = resolve_options(DEFAULTS, config, flags)
    if cfg["directions"] not in DIRECTIONS:
        raise GradlabError(f"unknown directions {cfg['directions']!r}; choose from: {', '.join(DIRECTIONS)}")
    if cfg["split"] not in ("train", "test"):
        raise GradlabError(f"unknown split {cfg['split']!r}; choose from: train, test")
    if cfg["to"] and cfg["directions"] != "interp":
        raise GradlabError(f"--to applies to --directions interp, not {cfg['directions']!r}")
    rng = None
    if cfg["range"] not in (None, ""):
        vals = parse_float_list(cfg["range"], "range")
        if len(vals) != 2:
            raise GradlabError(f"invalid range {cfg['range']!r}: expected lo,hi")
        rng = (vals[0], vals[1])
    make_axes(*(rng or (-1.0, 1.0)), cfg["steps"], cfg["dims"])  # steps/range/dims checked before any work
    dev = resolve_device(cfg["device"])

    simplex = None
    if cfg["plane_vertices"]:
        which = [int(v) for v in parse_float_list(cfg["plane_vertices"], "plane vertices")]
        spath = find_run(cfg["runs_dir"], cfg["run"])
        if not (spath / "simplex.pt").is_file():
            raise GradlabError(f"run {spath} has no simplex.pt: --plane-vertices needs a `gradlab simplex` run")
        simplex = load_checkpoint(spath / "simplex.pt")
        source = read_config(spath)["config"].get("source_run")
        loaded = load_run(source, cfg["runs_dir"], device=dev)
    else:
        loaded = load_run(cfg["run"], cfg["runs_dir"], device=dev)
    model, data = loaded.model, loaded.data
    x, y = (data.x_train, data.y_train) if cfg["split"] == "train" else (data.x_test, data.y_test)
    batch_list = make_batches(x, y, cfg["batch_size"], cfg["batches"], dev)

    if simplex is not None:
        verts = [{n: t.to(dev) for n, t in v.items()} for v in simplex["vertices"]]
        dset = simplex_plane(verts, which)
        if cfg["dims"] != 2:
            raise GradlabError("--plane-vertices draws a plane: use --dims 2")
    else:
        to_w = None
        if cfg["to"]:
            other = load_run(cfg["to"], cfg["runs_dir"], device=dev)
            to_w = {n: p.detach() for n, p in other.model.named_parameters()}
        dset = choose_directions(cfg["directions"], model, dims=cfg["dims"], run_path=loaded.path, to_weights=to_w,
                                 batches=batch_list[:4], include_bn=cfg["include_bn"], seed=cfg["seed"], device=dev)

    cfg["source_run"] = str(loaded.path)
    with start_run("probe-landscape", cfg) as run_dir:
        t0 = time.perf_counter()
        if quiet:
            res = landscape(model, dset, batch_list, steps=cfg["steps"], range_=rng,
                            points_per_call=cfg["points_per_call"])
        else:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                          TimeRemainingColumn(), console=console, transient=True) as bar:
                task = bar.add_task("landscape grid", total=cfg["steps"] ** cfg["dims"])
                res = landscape(model, dset, batch_list, steps=cfg["steps"], range_=rng,
                                points_per_call=cfg["points_per_call"],
                                progress=lambda done, total: bar.update(task, completed=done, total=total))
        seconds = time.perf_counter() - t0
        table = res.frame()
        run_dir.write_csv("landscape.csv", table)
        saved = {f"d{i + 1}": {n: t.detach().cpu() for n, t in d.items()} for i, d in enumerate(dset.directions)}
        saved["axes"] = torch.stack(res.axes) if cfg["dims"] == 2 else res.axes[0]
        if dset.centre is not None:
            saved["centre"] = {n: t.detach().cpu() for n, t in dset.centre.items()}
        if dset.path is not None:
            saved["trajectory"] = dset.path.detach().cpu()
        if run_dir.enabled:
            save_checkpoint(saved, run_dir.path / "directions.pt")
        title = f"{cfg['directions'] if simplex is None else 'simplex plane'} directions, {cfg['split']} split"
        if cfg["dims"] == 1:
            marks = {k: v[0] for k, v in dset.points.items()}
            run_dir.save_figure(plots.landscape_line(res.axes[0], res.loss, res.acc, log_scale=cfg["log_scale"],
                                                     title=title, marks=marks), "landscape_1d")
        else:
            run_dir.save_figure(plots.landscape_contour(res.axes, res.loss, log_scale=cfg["log_scale"], title=title,
                                                        path=dset.path, points=dset.points), "contour")
            run_dir.save_figure(plots.landscape_surface(res.axes, res.loss, log_scale=cfg["log_scale"], title=title),
                                "surface")
        run_dir.tb.add_histogram("landscape/loss", res.loss.float(), 0)
        at0 = (res.coords == 0).all(dim=1)
        metrics = {"grid_points": len(table), "seconds": round(seconds, 3),
                   "ms_per_point": round(1e3 * seconds / len(table), 4),
                   "loss_min": float(res.loss.min()), "loss_max": float(res.loss.max())}
        if bool(at0.any()):
            metrics["centre_loss"] = float(res.loss[at0][0])
            metrics["centre_acc"] = float(res.acc[at0][0])
        metrics.update(dset.info)
        if cfg["lambda_max"]:
            from gradlab.curvature.eigen import eigsh
            from gradlab.curvature.hessian_op import HessianOperator

            top = eigsh(HessianOperator(model, data=batch_list[:4]), k=1, which="LA", tol=1e-4, seed=cfg["seed"])
            metrics["lambda_max"] = float(top.values[0])
            metrics["lambda_max_converged"] = bool(top.converged)
        if not quiet:
            import pandas as pd

            render_table(pd.DataFrame([metrics]), title="landscape")
        finish_and_print(run_dir, "completed", metrics)
