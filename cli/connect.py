"""``gradlab connect RUN_A RUN_B``: a low-loss curve between two trained runs (Garipov et al., NeurIPS 2018)."""

from __future__ import annotations

import typer
from typing_extensions import Annotated

from gradlab_cli._common import (
    RUN_PANEL,
    rank_failures,
    ConfigOpt,
    QuietOpt,
    TrustCodeOpt,
    console,
    finish_and_print,
    render_table,
    resolve_command,
    run_options,
    start_run,
)
from gradlab_cli._options import with_flags

PANEL = "Curve"


def _options():
    from gradlab.landscape.connect import CONNECT_OPTIONS

    return CONNECT_OPTIONS


@with_flags((PANEL, _options()), (RUN_PANEL, run_options()))
def command(
    run_a: Annotated[str, typer.Argument(help="First endpoint: a trained run (folder, id or 'last').", show_default=False)],
    run_b: Annotated[str, typer.Argument(help="Second endpoint: a trained run of the same model.", show_default=False)],
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
    trust_code: TrustCodeOpt = False,
    *,
    flags: dict,
) -> None:
    """Train a Bezier or polychain curve between two runs' weights and compare its loss and accuracy with the
    straight line (barrier heights): connect.csv, connect.pt (the bend), TensorBoard scalars, plot."""
    import pandas as pd

    from gradlab.core.device import resolve_device
    from gradlab.core.errors import GradlabError
    from gradlab.landscape.connect import evaluate_paths, train_curve
    from gradlab.core.losses import loss_fn
    from gradlab.landscape.directions import interp_direction
    from gradlab.landscape.functional import source_loss
    from gradlab.landscape.grid import make_batches
    from gradlab.landscape.plots import connect_plot
    from gradlab.runs.checkpoints import save_checkpoint
    from gradlab.training.load import load_run

    cfg = resolve_command(_options(), config, flags, command="connect")
    from gradlab.core.distributed import init_from_env

    dev = resolve_device(cfg["device"])
    a = load_run(run_a, cfg["runs_dir"], device=dev, trust_code=trust_code)
    b = load_run(run_b, cfg["runs_dir"], device=dev, trust_code=trust_code)
    if a.path.resolve() == b.path.resolve():
        raise GradlabError(f"RUN_A and RUN_B are the same run ({a.path}): connect two different runs")
    wa = {n: p.detach() for n, p in a.model.named_parameters()}
    wb = {n: p.detach() for n, p in b.model.named_parameters()}
    interp_direction(wa, wb)  # different architectures: one line
    cfg.update(run_a=str(a.path), run_b=str(b.path), loss=source_loss(cfg["loss"], a, b))
    lfn = loss_fn(cfg["loss"])
    data = a.data
    ex, ey = (data.x_train, data.y_train) if cfg["split"] == "train" else (data.x_test, data.y_test)
    eval_batches = make_batches(ex, ey, 512, None, dev)
    bn = make_batches(data.x_train, data.y_train, 512, cfg["bn_batches"], dev)

    info = init_from_env(dev.type)  # under torchrun: every rank trains, the points are split, rank 0 writes
    quiet = quiet or not info.is_main
    with rank_failures(), start_run("connect", cfg, enabled=info.is_main) as rd:
        def on_epoch(epoch: int, rec: dict) -> None:
            rd.log_metrics(epoch, epoch, "curve_train", {k: v for k, v in rec.items() if k != "t"})
            if not quiet:
                console.print(f"epoch {epoch + 1}/{cfg['epochs']}: loss {rec['loss']:.4g}")

        bend, hist = train_curve(a.model, wa, wb, data.x_train, data.y_train, kind=cfg["curve"], epochs=cfg["epochs"],
                                 lr=cfg["lr"], batch_size=cfg["batch_size"], seed=cfg["seed"], device=dev,
                                 on_epoch=on_epoch, loss_fn=lfn)
        table, metrics = evaluate_paths(a.model, wa, wb, bend, eval_batches, bn, kind=cfg["curve"],
                                        points=cfg["points"], dist=info, precision=cfg["precision"], loss_fn=lfn)
        rd.write_csv("connect.csv", table)
        rd.write_csv("connect_train.csv", pd.DataFrame(hist))
        if rd.enabled:
            save_checkpoint({"bend": {n: t.cpu() for n, t in bend.items()}}, rd.path / "connect.pt")
        for i, row in enumerate(table.itertuples(index=False)):
            rd.log_metrics(i, None, "path", {"t": row.t, "curve_loss": row.loss, "curve_acc": row.acc,
                                              "line_loss": row.line_loss, "line_acc": row.line_acc})
        rd.save_figure(connect_plot(table, curve=cfg["curve"], title=f"{cfg['curve']} curve vs straight line "
                                    f"({cfg['split']} split, {cfg['loss']})"), "connect")
        if not quiet:
            render_table(table, title=f"{cfg['curve']} curve vs straight line")
            render_table(pd.DataFrame([metrics]), title="barriers")
        finish_and_print(rd, "completed", {"curve": cfg["curve"], **metrics})
