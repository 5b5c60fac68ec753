"""``gradlab optimize``: run optimizers on a 2-D test function and compare their paths."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from gradlab_cli._common import (
    ConfigOpt,
    DeviceOpt,
    NameOpt,
    QuietOpt,
    RunsDirOpt,
    SeedOpt,
    console,
    finish_and_print,
    parse_float_list,
    render_table,
    resolve_options,
    start_run,
)

PANEL = "Optimization"
DEFAULTS = {
    "fn": "saddle", "opt": "sgd,momentum,adam,adahessian,curvature-gd,langevin", "steps": 200, "start": None,
    "lr": None, "tol": 1e-4, "escape_delta": 0.1, "cond": None, "gif": False,
}


def command(
    fn: Annotated[Optional[str], typer.Option("--fn", help="Test function: quadratic, saddle, monkey-saddle, rosenbrock, himmelblau, rastrigin, beale. (default: saddle)", rich_help_panel=PANEL)] = None,
    opt: Annotated[Optional[str], typer.Option("--opt", help="Comma list of optimizers from the registry (`gradlab list optimizers`). (default: sgd,momentum,adam,adahessian,curvature-gd,langevin)", rich_help_panel=PANEL)] = None,
    steps: Annotated[Optional[int], typer.Option(help="Steps per optimizer. (default: 200)", rich_help_panel=PANEL)] = None,
    start: Annotated[Optional[str], typer.Option(help="Start point x,y. (default: the function's usual start, e.g. -1.5,0.01 for saddle)", rich_help_panel=PANEL)] = None,
    lr: Annotated[Optional[float], typer.Option(help="One step size for every optimizer. (default: per optimizer, tuned for 2-D functions: sgd/momentum 0.01, adam 0.05, adahessian/curvature-gd 0.1, ...; smaller on rosenbrock and beale)", rich_help_panel=PANEL)] = None,
    tol: Annotated[Optional[float], typer.Option(help="Report the first step with loss - global minimum <= tol. (default: 1e-4)", rich_help_panel=PANEL)] = None,
    escape_delta: Annotated[Optional[float], typer.Option(help="Saddle escape = first step whose loss is this far below the saddle's value. (default: 0.1)", rich_help_panel=PANEL)] = None,
    cond: Annotated[Optional[float], typer.Option(help="quadratic only: condition number (Hessian diag(1, cond)). (default: 10)", rich_help_panel=PANEL)] = None,
    gif: Annotated[Optional[bool], typer.Option("--gif", help="Also write an animated trajectories.gif (needs pillow).", rich_help_panel=PANEL)] = None,
    runs_dir: RunsDirOpt = None,
    name: NameOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Run optimizers from one start point on a 2-D test function: trajectories.csv, a contour plot of all
    paths, and per optimizer the final point, steps to tol, saddle escape and the final point's type
    (exact Hessian eigenvalues)."""
    from gradlab.core.errors import GradlabError
    from gradlab.landscape.functions import build_function
    from gradlab.landscape.plots import trajectories_gif, trajectories_plot
    from gradlab.landscape.trajectories import optimize

    flags = dict(fn=fn, opt=opt, steps=steps, start=start, lr=lr, tol=tol, escape_delta=escape_delta, cond=cond,
                 gif=gif, runs_dir=runs_dir, name=name, seed=seed, device=device)
    cfg = resolve_options(DEFAULTS, config, flags)
    start_pt = parse_float_list(cfg["start"], "start point") if cfg["start"] not in (None, "") else None
    names = [s.strip() for s in str(cfg["opt"]).split(",") if s.strip()]
    if cfg["steps"] < 1:
        raise GradlabError(f"invalid steps: {cfg['steps']} (must be >= 1)")
    if cfg["lr"] is not None and cfg["lr"] <= 0:
        raise GradlabError(f"invalid lr: {cfg['lr']} (must be > 0)")
    if cfg["tol"] <= 0:
        raise GradlabError(f"invalid tol: {cfg['tol']} (must be > 0)")
    build_function(cfg["fn"], start_pt, cond=cfg["cond"])  # bad function/start/cond: one line, no run folder
    from gradlab.landscape.trajectories import registry_optimizer_factory

    for n in names:
        registry_optimizer_factory(n, cfg["lr"])  # unknown optimizer: one line, no run folder
    # 2-D functions are tiny: the CPU is always the right device; --device is accepted for uniformity

    with start_run("optimize", cfg) as run:
        done = []
        traj, summary, fn_obj = optimize(
            cfg["fn"], names, steps=cfg["steps"], start=start_pt, lr=cfg["lr"], tol=cfg["tol"],
            escape_delta=cfg["escape_delta"], cond=cfg["cond"], seed=cfg["seed"], progress=done.append,
        )
        run.write_csv("trajectories.csv", traj)
        run.write_csv("optimizers.csv", summary)
        for n, grp in traj.groupby("optimizer", sort=False):
            for row in grp.itertuples(index=False):
                if row.loss == row.loss and abs(row.loss) < 1e300:
                    run.tb.add_scalar(f"{n}/loss", row.loss, row.step)
                    run.tb.add_scalar(f"{n}/grad_norm", row.grad_norm, row.step)
        run.save_figure(trajectories_plot(fn_obj, traj), "trajectories")
        if cfg["gif"]:
            ok = trajectories_gif(fn_obj, traj, Path(run.path) / "plots" / "trajectories.gif")
            if not ok and not quiet:
                console.print("[yellow]pillow is not installed: no GIF written[/yellow]")
        if not quiet:
            cols = [c for c in ("optimizer", "lr", "final_x", "final_y", "final_loss", "steps_to_tol", "escaped",
                                "escape_step", "min_dist_to_saddle", "hess_eig_min", "hess_eig_max", "point_type")
                    if c in summary.columns]
            shown = summary[cols].astype(object).where(summary[cols].notna(), None)
            render_table(shown, title=f"{cfg['fn']} from {tuple(fn_obj.point.tolist())}, {cfg['steps']} steps")
        best = summary.loc[summary["final_loss"].astype(float).idxmin()]
        metrics = {"fn": cfg["fn"], "optimizers": len(names), "best_optimizer": best["optimizer"],
                   "best_final_loss": float(best["final_loss"])}
        if "escaped" in summary.columns:
            metrics["escaped"] = int(summary["escaped"].sum())
        finish_and_print(run, "completed", metrics)
