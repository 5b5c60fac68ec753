"""``gradlab simplex``: grow a low-loss simplex around a trained run (Benton et al., ICML 2021)."""

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

PANEL = "Simplex"
DEFAULTS = {
    "run": None, "vertices": 3, "epochs": 5, "volume_reg": 0.01, "lr": 0.05, "batch_size": 128, "samples": 10,
    "init_scale": 0.1, "split": "test", "bn_batches": 8,
}


def command(
    vertices: Annotated[Optional[int], typer.Option(help="Vertices K >= 2; vertex 0 is the run's weights. (default: 3)", rich_help_panel=PANEL)] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs for each added vertex. (default: 5)", rich_help_panel=PANEL)] = None,
    volume_reg: Annotated[Optional[float], typer.Option(help="R: weight of -log(volume) in the loss (pushes vertices apart). (default: 0.01)", rich_help_panel=PANEL)] = None,
    lr: Annotated[Optional[float], typer.Option(help="SGD learning rate (momentum 0.9, cosine schedule). (default: 0.05)", rich_help_panel=PANEL)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Training batch size. (default: 128)", rich_help_panel=PANEL)] = None,
    samples: Annotated[Optional[int], typer.Option(help="M random interior points evaluated and ensembled. (default: 10)", rich_help_panel=PANEL)] = None,
    init_scale: Annotated[Optional[float], typer.Option(help="Offset of a new vertex from the centroid, relative to each filter's norm. (default: 0.1)", rich_help_panel=PANEL)] = None,
    split: Annotated[Optional[str], typer.Option(help="Evaluation split: train or test. (default: test)", rich_help_panel=PANEL)] = None,
    bn_batches: Annotated[Optional[int], typer.Option(help="Training batches (of 512) for recomputing BatchNorm statistics at each point. (default: 8)", rich_help_panel=PANEL)] = None,
    run: RunRefOpt = None,
    runs_dir: RunsDirOpt = None,
    name: NameOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Train a simplex of K vertices whose whole interior has low loss, starting from a trained run:
    simplex.csv (vertices, centre, interior samples, ensemble), simplex.pt for `probe landscape
    --plane-vertices`, TensorBoard scalars and plots."""
    import pandas as pd

    from gradlab.core.device import resolve_device
    from gradlab.core.errors import GradlabError
    from gradlab.landscape.grid import make_batches
    from gradlab.landscape.plots import simplex_plot
    from gradlab.landscape.simplex import evaluate_simplex, train_simplex
    from gradlab.runs.checkpoints import save_checkpoint
    from gradlab.training.load import load_run

    flags = dict(run=run, vertices=vertices, epochs=epochs, volume_reg=volume_reg, lr=lr, batch_size=batch_size,
                 samples=samples, init_scale=init_scale, split=split, bn_batches=bn_batches, runs_dir=runs_dir,
                 name=name, seed=seed, device=device)
    cfg = resolve_options(DEFAULTS, config, flags)
    for key, low in (("vertices", 2), ("epochs", 1), ("batch_size", 1), ("samples", 1), ("bn_batches", 1)):
        if cfg[key] < low:
            raise GradlabError(f"invalid {key.replace('_', '-')}: {cfg[key]} (must be >= {low})")
    if cfg["volume_reg"] < 0 or cfg["lr"] <= 0 or cfg["init_scale"] <= 0:
        raise GradlabError("invalid value: --volume-reg must be >= 0, --lr and --init-scale > 0")
    if cfg["split"] not in ("train", "test"):
        raise GradlabError(f"unknown split {cfg['split']!r}; choose from: train, test")
    dev = resolve_device(cfg["device"])
    loaded = load_run(cfg["run"], cfg["runs_dir"], device=dev)
    model, data = loaded.model, loaded.data
    cfg["source_run"] = str(loaded.path)
    ex, ey = (data.x_train, data.y_train) if cfg["split"] == "train" else (data.x_test, data.y_test)
    eval_batches = make_batches(ex, ey, 512, None, dev)
    bn = make_batches(data.x_train, data.y_train, 512, cfg["bn_batches"], dev)

    with start_run("simplex", cfg) as rd:
        def on_epoch(vertex: int, epoch: int, rec: dict) -> None:
            step = (vertex - 1) * cfg["epochs"] + epoch
            rd.log_metrics(step, epoch, f"vertex{vertex}", rec)
            if not quiet:
                console.print(f"vertex {vertex} epoch {epoch + 1}/{cfg['epochs']}: "
                              + ", ".join(f"{k} {v:.4g}" for k, v in rec.items()))

        res = train_simplex(model, data.x_train, data.y_train, vertices=cfg["vertices"], epochs=cfg["epochs"],
                            volume_reg=cfg["volume_reg"], lr=cfg["lr"], batch_size=cfg["batch_size"],
                            init_scale=cfg["init_scale"], seed=cfg["seed"], device=dev, on_epoch=on_epoch)
        table, metrics = evaluate_simplex(model, res.vertices, eval_batches, bn, samples=cfg["samples"],
                                          seed=cfg["seed"])
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
        finish_and_print(rd, "completed", {"vertices": cfg["vertices"], **metrics})
