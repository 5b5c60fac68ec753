"""``gradlab optimize``: run optimizers on a 2-D test function and compare their paths."""

from __future__ import annotations

import re
from pathlib import Path

from gradlab_cli._common import (
    RUN_PANEL,
    ConfigOpt,
    QuietOpt,
    console,
    finish_and_print,
    is_rank0,
    parse_float_list,
    render_table,
    resolve_command,
    run_options,
    start_run,
)
from gradlab_cli._options import with_flags

PANEL = "Optimization"


def _options():
    from gradlab.landscape.trajectories import OPTIMIZE_OPTIONS

    return OPTIMIZE_OPTIONS


def check_optimize(cfg: dict) -> tuple:
    """``(start point or None, optimizer names)`` of a resolved config, after every check that
    needs more than one option (the function, its start point and cond, the optimizer names),
    so that a mistake is one line and no run folder; ``gradlab run`` calls it too."""
    from gradlab.landscape.basins import check_basin_options
    from gradlab.landscape.functions import build_function
    from gradlab.landscape.trajectories import registry_optimizer_factory

    start_pt = parse_float_list(cfg["start"], "start point") if cfg["start"] not in (None, "") else None
    names = [s.strip() for s in str(cfg["opt"]).split(",") if s.strip()]
    build_function(cfg["fn"], start_pt, cond=cfg["cond"])  # bad function/start/cond: one line, no run folder
    for n in names:
        registry_optimizer_factory(n, cfg["lr"])  # unknown optimizer: one line, no run folder
    check_basin_options(cfg["starts"], cfg["grid"])  # --grid 1, too many starts
    return start_pt, names


@with_flags((PANEL, _options()), (RUN_PANEL, run_options()))
def command(
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
    *,
    flags: dict,
) -> None:
    """Run optimizers from one start point on a 2-D test function: trajectories.csv, a contour plot of all
    paths, and per optimizer the final point, steps to tol, saddle escape and the final point's type
    (exact Hessian eigenvalues). With --starts N and/or --grid K, also the basins of attraction: every
    optimizer from every start, each start labelled by the minimum it reaches (basins.csv, basin_counts.csv,
    a plot per optimizer)."""
    from gradlab.landscape.plots import trajectories_gif, trajectories_plot
    from gradlab.landscape.trajectories import optimize

    cfg = resolve_command(_options(), config, flags, command="optimize")
    start_pt, names = check_optimize(cfg)
    # 2-D functions are tiny: the CPU is always the right device; --device is accepted for uniformity
    if not is_rank0():  # under torchrun rank 0 makes the one run (milliseconds of work to share)
        return

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
        run.save_figure(trajectories_plot(fn_obj, traj, arrows=cfg["arrows"]), "trajectories")
        if cfg["gif"]:
            ok = trajectories_gif(fn_obj, traj, Path(run.path) / "plots" / "trajectories.gif")
            if not ok and not quiet:
                console.print("[yellow]pillow is not installed: no GIF written[/yellow]")
        n_starts = cfg["starts"] + cfg["grid"] ** 2
        counts = _basins(run, cfg, names, quiet) if n_starts else None
        if not quiet:
            cols = [c for c in ("optimizer", "lr", "final_x", "final_y", "final_loss", "steps_to_tol", "escaped",
                                "escape_step", "min_dist_to_saddle", "hess_eig_min", "hess_eig_max", "point_type")
                    if c in summary.columns]
            shown = summary[cols].astype(object).where(summary[cols].notna(), None)
            render_table(shown, title=f"{cfg['fn']} from {tuple(fn_obj.point.tolist())}, {cfg['steps']} steps")
        final = summary["final_loss"].astype(float)
        finite = final[final.abs() < float("inf")]  # a diverged path (nan, inf) is never the best
        metrics = {"fn": cfg["fn"], "optimizers": len(names),
                   "best_optimizer": summary.loc[finite.idxmin(), "optimizer"] if len(finite) else "none",
                   "best_final_loss": float(finite.min()) if len(finite) else float("nan")}
        if "escaped" in summary.columns:
            metrics["escaped"] = int(summary["escaped"].sum())
        if counts is not None:
            metrics.update(starts=n_starts, basins=int(counts["basin"].nunique()))
        finish_and_print(run, "completed", metrics)


def _basins(run, cfg: dict, names: list, quiet: bool):
    """The basins of attraction of ``--starts``/``--grid`` (gradlab.landscape.basins): basins.csv,
    basin_counts.csv, plots/basins.png (and TensorBoard), a table of counts; returns the counts."""
    from rich.progress import Progress

    from gradlab.landscape.basin_plots import basins_plot
    from gradlab.landscape.basins import basin_counts, basins

    total = len(names) * (cfg["starts"] + cfg["grid"] ** 2)
    with Progress(console=console, disable=quiet, transient=True) as bar:
        task = bar.add_task("basins", total=total)
        offsets = {n: i * (total // len(names)) for i, n in enumerate(names)}
        table, fn = basins(cfg["fn"], names, starts=cfg["starts"], grid=cfg["grid"], steps=cfg["steps"], lr=cfg["lr"],
                           cond=cfg["cond"], radius=cfg["basin_radius"], seed=cfg["seed"],
                           progress=lambda n, done, _: bar.update(task, completed=offsets[n] + done))
    counts = basin_counts(table)
    run.write_csv("basins.csv", table)
    run.write_csv("basin_counts.csv", counts)
    for row in counts.itertuples(index=False):  # tags without spaces or brackets
        tag = re.sub(r"[^\w.,/-]+", "_", f"basins/{row.optimizer}/{row.basin}").strip("_").replace(",_", ",")
        run.tb.add_scalar(tag, row.starts, 0)
    run.save_figure(basins_plot(fn, table, arrows=cfg["arrows"]), "basins")
    if not quiet:
        shown = counts.assign(share=counts["share"].map("{:.1%}".format))
        render_table(shown, title=f"basins of attraction: {total // len(names)} starts per optimizer, "
                                  f"{cfg['steps']} steps")
    return counts
