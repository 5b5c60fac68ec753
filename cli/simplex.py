"""``gradlab simplex``: grow a low-loss simplex around a trained run (Benton et al., ICML 2021)."""

from __future__ import annotations

from gradlab_cli._common import (
    RUN_PANEL,
    rank_failures,
    ConfigOpt,
    QuietOpt,
    RunRefOpt,
    TrustCodeOpt,
    console,
    finish_and_print,
    render_table,
    resolve_command,
    run_options,
    start_run,
)
from gradlab_cli._options import with_flags

PANEL = "Simplex"


def _options():
    from gradlab.landscape.simplex import SIMPLEX_OPTIONS

    return SIMPLEX_OPTIONS


@with_flags((PANEL, _options()), (RUN_PANEL, run_options()))
def command(
    run: RunRefOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
    trust_code: TrustCodeOpt = False,
    *,
    flags: dict,
) -> None:
    """Train a simplex of K vertices whose whole interior has low loss, starting from a trained run:
    simplex.csv (vertices, centre, interior samples, ensemble), simplex.pt for `probe landscape
    --plane-vertices`, TensorBoard scalars and plots."""
    import pandas as pd

    from gradlab.core.device import resolve_device
    from gradlab.core.losses import loss_fn
    from gradlab.landscape.functional import source_loss
    from gradlab.landscape.grid import make_batches
    from gradlab.landscape.plots import simplex_plot
    from gradlab.landscape.simplex import ensemble_verdict, evaluate_simplex, train_simplex
    from gradlab.runs.checkpoints import save_checkpoint
    from gradlab.training.load import load_run

    cfg = {"run": run, **resolve_command(_options(), config, flags, command="simplex")}
    from gradlab.core.distributed import init_from_env

    dev = resolve_device(cfg["device"])
    loaded = load_run(cfg["run"], cfg["runs_dir"], device=dev, trust_code=trust_code)
    model, data = loaded.model, loaded.data
    cfg["source_run"] = str(loaded.path)
    cfg["loss"] = source_loss(cfg["loss"], loaded)
    ex, ey = (data.x_train, data.y_train) if cfg["split"] == "train" else (data.x_test, data.y_test)
    eval_batches = make_batches(ex, ey, 512, None, dev)
    bn = make_batches(data.x_train, data.y_train, 512, cfg["bn_batches"], dev)

    info = init_from_env(dev.type)  # under torchrun: every rank trains, the points are split, rank 0 writes
    quiet = quiet or not info.is_main
    with rank_failures(), start_run("simplex", cfg, enabled=info.is_main) as rd:
        def on_epoch(vertex: int, epoch: int, rec: dict) -> None:
            step = (vertex - 1) * cfg["epochs"] + epoch
            rd.log_metrics(step, epoch, f"vertex{vertex}", rec)
            if not quiet:
                console.print(f"vertex {vertex} epoch {epoch + 1}/{cfg['epochs']}: "
                              + ", ".join(f"{k} {v:.4g}" for k, v in rec.items()))

        res = train_simplex(model, data.x_train, data.y_train, vertices=cfg["vertices"], epochs=cfg["epochs"],
                            volume_reg=cfg["volume_reg"], lr=cfg["lr"], batch_size=cfg["batch_size"],
                            init_scale=cfg["init_scale"], seed=cfg["seed"], device=dev, on_epoch=on_epoch,
                            loss_fn=loss_fn(cfg["loss"]))
        table, metrics = evaluate_simplex(model, res.vertices, eval_batches, bn, samples=cfg["samples"],
                                          seed=cfg["seed"], dist=info, precision=cfg["precision"], loss=cfg["loss"])
        rd.write_csv("simplex.csv", table)
        rd.write_csv("simplex_train.csv", res.history)
        if rd.enabled:
            save_checkpoint({"vertices": [{n: t.detach().cpu() for n, t in v.items()} for v in res.vertices]},
                            rd.path / "simplex.pt")
        for i, row in enumerate(table.itertuples(index=False)):
            rd.tb.add_scalar(f"simplex/{row.kind}_loss", row.loss, i)
            rd.tb.add_scalar(f"simplex/{row.kind}_acc", row.acc, i)
        for k, v in metrics.items():
            rd.tb.add_scalar(f"summary/{k}", v, 0)
        rd.save_figure(simplex_plot(table, title=f"simplex of {cfg['vertices']} vertices ({cfg['split']} split)"),
                       "simplex")
        if not quiet:
            render_table(table, title="simplex points")
            render_table(pd.DataFrame([metrics]), title="simplex summary")
        if rd.enabled:
            print(ensemble_verdict(metrics), flush=True)  # even with --quiet: it says whether the simplex helped
        finish_and_print(rd, "completed", {"vertices": cfg["vertices"], **metrics})
