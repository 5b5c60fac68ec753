"""``gradlab attack check RUN``: the gradient-masking checklist (:mod:`gradlab.attacks.check`).

Reached through ``gradlab attack`` (:func:`gradlab_cli.main.make_app` routes ``attack check``
here). Exit code: 0 when every check passes, 1 when one failed ("gradient masking suspected"),
2 for bad input (one line on stderr, no run folder).
"""

from __future__ import annotations

from typing import Optional

import typer
from typing_extensions import Annotated

from gradlab.core.budgets import NORMS
from gradlab.core.options import Option, Options
from gradlab.runs.options import RUN_OPTIONS
from gradlab_cli._common import (RUN_PANEL, ConfigOpt, QuietOpt, TrustCodeOpt, console, err_console,
                                 finish_and_print, render_table, start_run)
from gradlab_cli._options import with_flags

CHECK = "Checks"
CHECK_OPTIONS = Options(
    Option("eps", float, 0.1, "the budget every check attacks at (pixel units)", low=0),
    Option("norm", str, "linf", "budget norm", choices=NORMS),
    Option("n_examples", int, 200, "attack the first N test examples (small: the checks are a smoke test)", low=1),
    Option("steps", int, 10, "PGD iterations (the longer run takes 5x as many)", low=1),
    Option("restarts", int, 5, "PGD restarts of the more_restarts check", low=2),
    Option("queries", int, 1000, "Square attack query budget per example", low=1),
    Option("tolerance", float, 0.02, "slack of every comparison, as a fraction of the examples (4 of the default 200)",
           low=0, high=1),
    Option("batch_size", int, 256, "examples per attack batch", low=1),
)
OWN = Options(Option("run", str, "last", "the run to check")) + CHECK_OPTIONS + RUN_OPTIONS


@with_flags((CHECK, CHECK_OPTIONS), (RUN_PANEL, RUN_OPTIONS))
def command(
    check: Annotated[str, typer.Argument(help="'check'", show_default=False, metavar="check")],
    run: Annotated[Optional[str], typer.Argument(help="The run to check: a run folder, a run id or 'last'.")] = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
    trust_code: TrustCodeOpt = False,
    *,
    flags: dict,
) -> int:
    """Check a run's attack evaluation for gradient masking (Athalye et al. 2018; Carlini et al. 2019).

    Iterative vs one-step, more steps and restarts, an unbounded eps, Square (black-box) vs white-box, PGD's loss curve; writes check.csv and loss_curve.png.

    Exit code 0: every check passed; 1: a check failed (gradient masking suspected); 2: bad input.
    """
    from gradlab.core.config import load_yaml, normalise_keys, resolve_config
    from gradlab.core.errors import GradlabError

    if check != "check":  # pragma: no cover - main routes only `attack check` here
        raise GradlabError(f"expected 'check', got {check!r}")
    file_cfg = normalise_keys(load_yaml(config)) if config is not None else {}
    cfg = resolve_config(OWN, [], [(f"in {config}", file_cfg), ("", {**flags, **({"run": run} if run else {})})],
                         command="attack-check")
    from gradlab.core.budgets import check_eps

    check_eps(cfg["eps"], cfg["norm"])
    import torch

    from gradlab.attacks.check import VERDICT, loss_curve_figure, masking_checks
    from gradlab.core.device import resolve_device
    from gradlab.runs.records import find_run
    from gradlab.training.load import load_run

    path = find_run(cfg["runs_dir"], cfg["run"], require_checkpoint=True)
    loaded = load_run(str(path), cfg["runs_dir"], device=resolve_device(cfg["device"]), trust_code=trust_code)
    x, y = loaded.data.x_test[: cfg["n_examples"]], loaded.data.y_test[: cfg["n_examples"]]
    if x.shape[0] == 0:
        raise GradlabError(f"run {path.name} has an empty test split: nothing to attack")
    check_eps(cfg["eps"], cfg["norm"], x[0].numel())
    cfg["run"] = str(path)
    torch.manual_seed(cfg["seed"])
    run_dir = start_run("attack-check", cfg)
    with run_dir:
        status = None if quiet else console.status("")
        if status is not None:
            status.start()

        def progress(name: str) -> None:
            if status is not None:
                status.update(f"check: running {name}")

        try:
            table, extra = masking_checks(loaded.model, x, y, cfg["eps"], cfg["norm"], cfg["steps"], cfg["restarts"],
                                          cfg["queries"], cfg["tolerance"], cfg["batch_size"], cfg["seed"], progress)
        finally:
            if status is not None:
                status.stop()
        run_dir.write_csv("check.csv", table)
        run_dir.save_figure(loss_curve_figure(extra["loss_curve"], f"PGD-{cfg['steps']} loss, eps {cfg['eps']:g}"),
                            "loss_curve")
        failed = table[~table["passed"]]
        if not quiet:
            shown = table[["check", "figures"]].copy()
            shown["result"] = ["ok" if p else "FAILED" for p in table["passed"]]
            render_table(shown, title=f"attack check of {path.name} ({x.shape[0]} examples, eps {cfg['eps']:g} "
                                      f"{cfg['norm']})")
        for row in failed.itertuples(index=False):
            err_console.print(f"{row.check}: {row.figures}: {VERDICT}", highlight=False)
        finish_and_print(run_dir, "completed", {
            "source_run": path.name, "eps": cfg["eps"], "norm": cfg["norm"], "n": int(x.shape[0]),
            "checks_failed": int(len(failed)), **{f"acc_{k}": v for k, v in extra["accuracy"].items()}})
    if len(failed):
        raise typer.Exit(1)
    return 0
