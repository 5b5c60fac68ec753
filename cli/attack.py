"""``gradlab attack NAME --eps E``: attack a trained run's model over an eps sweep."""

from __future__ import annotations

import sys
from pathlib import Path
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
    parse_float_list,
    render_table,
    resolve_options,
    start_run,
)

ATTACK = "Attack"
OUTPUT = "Output"

# Config keys -> attack keyword options (None = the attack's own default).
ATTACK_KEYS = ("norm", "steps", "alpha", "restarts", "random_start", "targeted", "target_class", "eot", "eot_noise")
DEFAULTS = {
    "run": None, "eps": "0.03", "n_examples": None, "norm": "linf", "steps": None, "alpha": None,
    "restarts": None, "random_start": None, "targeted": False, "target_class": None, "eot": 1,
    "eot_noise": 0.0, "batch_size": 256, "save_adv": False, "grid": 8,
}


def command(
    attack: Annotated[str, typer.Argument(help="Attack: fgsm, pgd, curvature or curls (`gradlab list attacks`).", show_default=False)],
    eps: Annotated[Optional[str], typer.Option(help="Budget in pixel units, or a comma list for a sweep: 0,0.01,0.03,0.1. (default: 0.03)", rich_help_panel=ATTACK)] = None,
    norm: Annotated[Optional[str], typer.Option(help="Budget norm: linf or l2. (default: linf)", rich_help_panel=ATTACK)] = None,
    steps: Annotated[Optional[int], typer.Option(help="Iterations (pgd, curvature, curls). (default: the attack's: pgd 10, curvature 1, curls 20)", rich_help_panel=ATTACK)] = None,
    alpha: Annotated[Optional[float], typer.Option(help="Step size in pixel units. (default: 2.5*eps/steps)", rich_help_panel=ATTACK)] = None,
    restarts: Annotated[Optional[int], typer.Option(help="PGD restarts; the worst case per example is kept. (default: 1)", rich_help_panel=ATTACK)] = None,
    random_start: Annotated[Optional[bool], typer.Option("--random-start/--no-random-start", help="PGD: start at a uniform point of the eps-ball. (default: on)", rich_help_panel=ATTACK)] = None,
    targeted: Annotated[Optional[bool], typer.Option("--targeted", help="Push towards a target class (--target-class, else the least-likely class).", rich_help_panel=ATTACK)] = None,
    target_class: Annotated[Optional[int], typer.Option(help="Target class of a targeted attack (implies --targeted).", rich_help_panel=ATTACK)] = None,
    eot: Annotated[Optional[int], typer.Option(help="Expectation over transformation: average the gradient over N passes (dropout sampled). (default: 1)", rich_help_panel=ATTACK)] = None,
    eot_noise: Annotated[Optional[float], typer.Option(help="EOT random transform: Gaussian input noise of this std (pixel units). (default: 0)", rich_help_panel=ATTACK)] = None,
    n_examples: Annotated[Optional[int], typer.Option(help="Attack the first N test examples. (default: the whole test split)", rich_help_panel=ATTACK)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Examples per attack batch. (default: 256)", rich_help_panel=ATTACK)] = None,
    save_adv: Annotated[Optional[bool], typer.Option("--save-adv", help="Also store clean and adversarial examples, labels and predictions in adversarial.npz.", rich_help_panel=OUTPUT)] = None,
    grid: Annotated[Optional[int], typer.Option(help="Examples shown in the clean/adversarial/perturbation grid. (default: 8)", rich_help_panel=OUTPUT)] = None,
    run: RunRefOpt = None,
    runs_dir: RunsDirOpt = None,
    name: NameOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Attack the model of a trained run (eval mode) at one or more eps; writes attack.csv, plots, TensorBoard."""
    from gradlab.attacks import ATTACKS, NORMS, attack_options
    from gradlab.core.errors import GradlabError

    ATTACKS.entry(attack)  # unknown name: one line listing the valid ones
    flags = dict(
        run=run, eps=eps, norm=norm, steps=steps, alpha=alpha, restarts=restarts, random_start=random_start,
        targeted=targeted, target_class=target_class, eot=eot, eot_noise=eot_noise, n_examples=n_examples,
        batch_size=batch_size, save_adv=save_adv, grid=grid, runs_dir=runs_dir, name=name, seed=seed, device=device,
    )
    cfg = resolve_options(DEFAULTS, config, flags)
    eps_list = _eps_list(cfg["eps"])
    if cfg["norm"] not in NORMS:
        raise GradlabError(f"unknown norm {cfg['norm']!r}; choose from: {', '.join(NORMS)}")
    from gradlab.attacks.base import check_eps

    for e in eps_list:
        check_eps(e, cfg["norm"])
    for key in ("steps", "restarts", "eot", "batch_size", "n_examples"):
        if cfg[key] is not None and (int(cfg[key]) != cfg[key] or cfg[key] < 1):
            raise GradlabError(f"invalid {key.replace('_', '-')}: {cfg[key]} (must be an integer >= 1)")
    if cfg["grid"] < 0:
        raise GradlabError(f"invalid grid: {cfg['grid']} (must be >= 0)")
    if cfg["target_class"] is not None:
        cfg["targeted"] = True
    accepted = set(attack_options(attack))
    opts, ignored = {}, []
    for key in ATTACK_KEYS:
        value = cfg[key]
        if value is None or (key in ("targeted",) and value is False) or (key == "eot" and value == 1) or (key == "eot_noise" and value == 0):
            continue
        if key in accepted:
            opts[key] = value
        else:
            ignored.append("--" + key.replace("_", "-"))
    if "norm" in accepted:
        opts["norm"] = cfg["norm"]

    import torch

    from gradlab.core.device import resolve_device
    from gradlab.runs.records import find_run
    from gradlab.training.load import load_run

    source = find_run(cfg["runs_dir"], cfg["run"], require_checkpoint=True)
    dev = resolve_device(cfg["device"])
    loaded = load_run(str(source), cfg["runs_dir"], device=dev)
    data = loaded.data
    x, y = data.x_test, data.y_test
    n_total = x.shape[0]
    if cfg["n_examples"] is not None and cfg["n_examples"] < n_total:
        x, y = x[: cfg["n_examples"]], y[: cfg["n_examples"]]
    if x.shape[0] == 0:
        raise GradlabError(f"run {source.name} has an empty test split: nothing to attack")
    for e in eps_list:
        check_eps(e, cfg["norm"], x[0].numel())
    cfg["run"] = str(source)
    torch.manual_seed(cfg["seed"])
    opts["seed"] = cfg["seed"]

    if ignored and not quiet:
        err_console.print(f"gradlab: note: {attack} does not use {', '.join(ignored)}; ignored", highlight=False)
    run_dir = start_run("attack", {"attack": attack, **cfg, "eps": eps_list})
    with run_dir:
        result = _sweep_with_progress(loaded.model, x, y, attack, eps_list, cfg, opts, quiet)
        table = result.table
        run_dir.write_csv("attack.csv", table)
        _log(run_dir, result, attack, cfg)
        if cfg["save_adv"]:
            _save_npz(run_dir.path / "adversarial.npz", result, eps_list)
        has_dropout = any(isinstance(m, torch.nn.modules.dropout._DropoutNd) for m in loaded.model.modules())
        mode = "eval mode (BatchNorm on running statistics, dropout off)"
        if cfg["eot"] > 1 and has_dropout:
            mode += f"; dropout sampled in the {cfg['eot']} EOT passes per gradient"
        if not quiet:
            render_table(table, title=f"{attack} on {source.name} ({x.shape[0]} of {n_total} test examples, norm {cfg['norm']})")
            console.print(f"model ran in {mode}", highlight=False)
        worst = table.iloc[table["eps"].values.argmax()]
        run_dir.log_text("attack/model_mode", f"model ran in {mode}")
        finish_and_print(
            run_dir,
            "completed",
            {
                "attack": attack, "source_run": source.name, "norm": cfg["norm"], "n": int(x.shape[0]),
                "clean_acc": float(worst["clean_acc"]), "max_eps": float(worst["eps"]),
                "robust_acc": float(worst["robust_acc"]), "success_rate": float(worst["success_rate"]),
                "model_mode": "eval",
            },
        )


def _eps_list(value) -> list:
    from gradlab.core.errors import GradlabError

    if isinstance(value, bool):
        raise GradlabError(f"invalid eps {value!r}: expected a number")
    if isinstance(value, (list, tuple)):
        try:
            vals = [float(v) for v in value]
        except (TypeError, ValueError):
            raise GradlabError(f"invalid eps {value!r}: expected numbers") from None
    elif isinstance(value, (int, float)):
        vals = [float(value)]
    else:
        vals = parse_float_list(str(value), "eps")
    if not vals:
        raise GradlabError("invalid eps: empty list")
    return list(dict.fromkeys(vals))  # a repeated value is attacked once


def _sweep_with_progress(model, x, y, attack, eps_list, cfg, opts, quiet):
    from gradlab.attacks.report import robustness_sweep

    keep = cfg["save_adv"] or cfg["grid"] > 0
    args = (model, x, y, attack, eps_list, cfg["batch_size"])
    if quiet or not sys.stdout.isatty():
        return robustness_sweep(*args, keep_adv=keep, **opts)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    total = x.shape[0] * len(eps_list)
    with Progress(
        TextColumn(f"[bold]{attack}[/bold] eps {{task.fields[eps]}}"), BarColumn(), MofNCompleteColumn(),
        TimeRemainingColumn(), console=console, transient=True,
    ) as bar:
        task = bar.add_task("attack", total=total, eps="")
        order = {e: i for i, e in enumerate(eps_list)}

        def progress(e, done, n):
            bar.update(task, completed=order[e] * n + done, eps=f"{e:g}")

        return robustness_sweep(*args, keep_adv=keep, progress=progress, **opts)


def _log(run_dir, result, attack: str, cfg: dict) -> None:
    """TensorBoard scalars (step = eps x 10^4), the accuracy plot and one image grid per eps."""
    from gradlab.attacks.plots import accuracy_vs_eps, adversarial_grid

    table = result.table
    for row in table.itertuples(index=False):
        step = int(round(row.eps * 10_000))
        run_dir.log_metrics(step, None, "attack", {
            "clean_acc": row.clean_acc, "robust_acc": row.robust_acc, "success_rate": row.success_rate,
            "mean_linf": row.mean_linf, "mean_l2": row.mean_l2, "mean_confidence": row.mean_confidence,
        })
    run_dir.log_text("attack/steps", "TensorBoard step = eps x 10000 (pixel units)")
    run_dir.save_figure(accuracy_vs_eps(table, title=f"{attack} ({cfg['norm']})"), "accuracy_vs_eps")
    if cfg["grid"] <= 0:
        return
    for i, eps in enumerate(result.adv):
        if eps == 0 and len(result.adv) > 1:
            continue  # nothing to see
        n = cfg["grid"]
        fig = adversarial_grid(result.x[:n], result.adv[eps][:n], result.y[:n], result.clean_pred[:n],
                               result.adv_pred[eps][:n], n=n, eps=eps, title=f"{attack}, eps = {eps:g} ({cfg['norm']})")
        run_dir.save_figure(fig, f"grid_eps{eps:g}", step=i)


def _save_npz(path: Path, result, eps_list) -> None:
    import numpy as np

    np.savez_compressed(
        path,
        eps=np.asarray(eps_list, dtype=np.float64),
        x=result.x.numpy(),
        y=result.y.numpy(),
        pred_clean=result.clean_pred.numpy(),
        x_adv=np.stack([result.adv[e].numpy() for e in eps_list]),  # (E, N, *input_shape)
        pred_adv=np.stack([result.adv_pred[e].numpy() for e in eps_list]),  # (E, N)
    )
