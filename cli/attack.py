"""``gradlab attack NAME --eps E``: attack a trained run's model over an eps sweep.

The attack's flags (``--norm``, ``--steps``, ...) are made from the attack registry's option
declarations (:func:`gradlab_cli._options.with_flags`), so a new attack option is declared once,
in its attack's file. What is specific to this command stays here: ``NAME`` as an argument,
``--eps`` as a sweep (``0,0.03,0.1``), the source run and the outputs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from gradlab.core.manifest import registry_view
from gradlab.runs.options import RUN_OPTIONS
from gradlab.core.options import Option, Options
from gradlab_cli._common import (
    RUN_PANEL,
    ConfigOpt,
    QuietOpt,
    RunRefOpt,
    TrustCodeOpt,
    console,
    distributed,
    finish_and_print,
    parse_float_list,
    render_table,
    start_run,
)
from gradlab_cli._options import with_flags
from gradlab_cli.attack_variants import VARIANTS

ATTACK = "Attack"
OUTPUT = "Output"
DEFAULT_EPS = "0.03"

SWEEP = Options(
    Option("n_examples", int, None, "attack the first N test examples (unset: the whole test split)", low=1),
    Option("batch_size", int, 256, "examples per attack batch", low=1),
)
OUTPUTS = Options(
    Option("save_adv", bool, False, "also store clean and adversarial examples, labels and predictions in "
           "adversarial.npz"),
    Option("grid", int, 8, "examples shown in the clean/adversarial/perturbation grid (0: none)", low=0),
)
# Keys of the run folder and the source run: flags of their own (gradlab_cli._common), checked here.
RUN_KEYS = Options(
    Option("attack", str, None, "the attack (the NAME argument)"),
    Option("run", str, None, "source run: a run folder, a run id under runs_dir, or 'last'"),
) + RUN_OPTIONS
OWN = RUN_KEYS + SWEEP + OUTPUTS + VARIANTS
TRANSFER_PANEL = "Transfer and on-manifold"

EpsOpt = Annotated[Optional[str], typer.Option(
    help="Budget in pixel units, or a comma list for a sweep: 0,0.01,0.03,0.1. (default: 0.03)", rich_help_panel=ATTACK)]


def __getattr__(name: str):
    # The command is made on each access, so an attack registered after this module was imported
    # (a plug-in module, a test) has its flags too.
    if name == "command":
        # the declarations (the manifest), so a typo is answered before torch is imported
        return with_flags((ATTACK, registry_view("attacks")), (ATTACK, SWEEP), (OUTPUT, OUTPUTS),
                          (TRANSFER_PANEL, VARIANTS), (RUN_PANEL, RUN_OPTIONS))(_command)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _command(
    attack: Annotated[Optional[str], typer.Argument(
        help="The attack (`gradlab list attacks`); unset: the `attack` key of --config.", show_default=False)] = None,
    eps: EpsOpt = None,
    run: RunRefOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
    trust_code: TrustCodeOpt = False,
    *,
    flags: dict,
) -> None:
    """Attack the model of a trained run (eval mode) at one or more eps; writes attack.csv, plots, TensorBoard.

    `gradlab attack check RUN` runs the gradient-masking checklist instead (see its --help).
    """
    from gradlab.core.config import load_yaml, normalise_keys
    from gradlab.core.errors import GradlabError

    file_cfg = normalise_keys(load_yaml(config)) if config is not None else {}
    file_eps = file_cfg.pop("eps", None)  # a sweep (text, number or list), not a declared option
    attack = attack or file_cfg.get("attack")  # an experiment stage may sweep the attack by name
    if not attack:
        raise GradlabError("name the attack: gradlab attack NAME (`gradlab list attacks`), or `attack:` in --config")
    typed = {**flags, "run": run}
    cfg, eps_list = resolve_attack(attack, [(f"in {config}", file_cfg), ("", typed)],
                                   eps if eps is not None else file_eps)
    from gradlab.attacks import attack_options

    # The attack takes its declared options; its seed is the run's (the same key).
    opts = {k: cfg[k] for k in attack_options(attack).names()}

    from gradlab.core.device import resolve_device
    from gradlab.core.distributed import rank_device
    from gradlab.runs.records import find_run

    source = find_run(cfg["runs_dir"], cfg["run"], require_checkpoint=True)
    dev = resolve_device(cfg["device"])
    with distributed(dev.type) as info:
        _attack(source, rank_device(dev, info), info, attack, eps_list, cfg, opts, quiet or not info.is_main,
                trust_code)


def _attack(source, dev, info, attack, eps_list, cfg, opts, quiet, trust_code) -> None:
    """Load, check, attack (under torchrun: this rank's batches) and, on rank 0, write the run."""
    import torch

    from gradlab.attacks.base import DROPOUTS
    from gradlab.core.budgets import check_eps, check_target_class
    from gradlab.core.errors import GradlabError
    from gradlab.training.load import load_run

    loaded = load_run(str(source), cfg["runs_dir"], device=dev, trust_code=trust_code)
    data = loaded.data
    if getattr(data, "streamed", False):  # a run trained with stream=true: attacked batch by batch
        from gradlab_cli.attack_stream import attack_streamed

        return attack_streamed(source, loaded, dev, info, attack, eps_list, cfg, opts, quiet)
    x, y = data.x_test, data.y_test
    n_total = x.shape[0]
    if cfg["n_examples"] is not None and cfg["n_examples"] < n_total:
        x, y = x[: cfg["n_examples"]], y[: cfg["n_examples"]]
    if x.shape[0] == 0:
        raise GradlabError(f"run {source.name} has an empty test split: nothing to attack")
    for e in eps_list:
        check_eps(e, cfg["norm"], x[0].numel())
    check_target_class(cfg["target_class"], data.spec.num_classes)  # before the run folder, not in it
    cfg["run"] = str(source)
    from gradlab.core.losses import run_loss

    cfg["loss"] = run_loss(loaded.config)  # the objective: the loss the run trained with (config.yaml)
    from gradlab_cli.attack_variants import prepare, write_manifold

    variant = prepare(cfg, attack, loaded, trust_code, dev)  # --source / --manifold, checked before the run folder
    torch.manual_seed(cfg["seed"])

    run_dir = start_run("attack", {**cfg, "eps": eps_list}, enabled=info.is_main)
    with run_dir:
        result = _sweep_with_progress(loaded.model, x, y, attack, eps_list, cfg, opts, quiet, info,
                                      sweep=variant.sweep if variant else None)
        if variant is not None and variant.kind == "manifold":
            write_manifold(run_dir, result, attack, cfg)  # (--manifold runs in one process)
            if not quiet:
                render_table(result, title=f"{attack} on {source.name}, {variant.title} ({x.shape[0]} examples)")
            worst = result.iloc[result["eps"].values.argmax()]
            finish_and_print(run_dir, "completed", {
                "attack": attack, "source_run": source.name, "norm": cfg["norm"], "n": int(x.shape[0]),
                "clean_acc": float(worst["clean_acc"]), "max_eps": float(worst["eps"]),
                "robust_acc": float(worst["robust_acc"]), "robust_on": float(worst["robust_on"]),
                "robust_off": float(worst["robust_off"]), "model_mode": "eval", **variant.extra})
            return
        table = result.table
        run_dir.write_csv("attack.csv", table)
        if run_dir.enabled:  # rank 0 only under torchrun: the others have no folder to draw into
            _log(run_dir, result, attack, cfg)
        figures = {}
        if result.norms is not None and run_dir.enabled:  # a minimum-norm attack: norms, their curve, median
            from gradlab_cli._minnorm import NORM_COLUMNS, terminal_table, write_minimum_norms

            figures = write_minimum_norms(run_dir, result, attack, cfg, eps_list)
            table = table.drop(columns=NORM_COLUMNS)  # in their own terminal table below
        if cfg["save_adv"] and run_dir.enabled:
            _save_npz(run_dir.path / "adversarial.npz", result, eps_list)
        has_dropout = any(isinstance(m, DROPOUTS) for m in loaded.model.modules())
        mode = "eval mode (BatchNorm on running statistics, dropout off)"
        from gradlab.attacks import ATTACKS

        eot = ATTACKS.entry(attack).obj.eot_passes(opts)  # an attack without EOT, or autoattack's rand default
        if eot > 1 and has_dropout:
            mode += f"; dropout sampled in the {eot} EOT passes per gradient"
        if not quiet:
            shown = table if not variant else table[  # within 80 columns
                ["eps", "clean_acc", "robust_acc", "source_clean_acc", "source_robust_acc", "success_rate", "n"]
            ].rename(columns={"source_clean_acc": "src_clean", "source_robust_acc": "src_robust"})
            render_table(shown, title=f"{attack} on {source.name} ({x.shape[0]} of {n_total} test examples, norm {cfg['norm']})"
                         + (f", {variant.title}" if variant else ""))
            if figures:
                render_table(terminal_table(result, figures), title=(
                    f"minimum {cfg['norm']} norms: {figures['n_found']} of {figures['n_attacked']} correct examples "
                    f"broken, median {figures['median_norm']:.4g}"))
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
                "model_mode": "eval", **({"median_norm": figures["median_norm"]} if figures else {}),
                **(variant.extra if variant else {}),
            },
        )


def resolve_attack(attack: str, sources: list, eps=None) -> tuple[dict, list]:
    """The checked configuration of ``gradlab attack ATTACK`` from ``[(where, values), ...]``
    (lowest precedence first) and its eps sweep (``None``: the default), every budget checked
    against the norm: what the command and ``gradlab run`` check before anything runs."""
    from gradlab.core.config import Slot, resolve_config

    cfg = resolve_config(OWN, [Slot("attack", registry_view("attacks"))], [*sources, ("", {"attack": attack})],
                         command="attack")
    eps_list = _eps_list(eps if eps is not None else DEFAULT_EPS)
    from gradlab.core.budgets import check_eps  # torch-free: names and numbers are checked before torch loads

    for e in eps_list:
        check_eps(e, cfg["norm"])
    return cfg, eps_list


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


def _sweep_with_progress(model, x, y, attack, eps_list, cfg, opts, quiet, info, sweep=None):
    from gradlab.attacks.report import robustness_sweep

    if sweep is None:  # the plain sweep splits the examples across torchrun's ranks, ascends the run's loss
        opts = {**opts, "dist": info, "criterion": cfg.get("loss")}
    robustness_sweep = sweep or robustness_sweep  # a transfer or on-manifold sweep (attack_variants)
    keep = cfg["save_adv"] or cfg["grid"] > 0
    args = (model, x, y, attack, eps_list, cfg["batch_size"])
    if quiet or not sys.stdout.isatty():
        return robustness_sweep(*args, keep_adv=keep, **opts)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from gradlab.attacks import ATTACKS

    once = getattr(ATTACKS.entry(attack).obj, "minimum_norm_attack", False)  # one search for every eps
    total = x.shape[0] * (1 if once else len(eps_list))
    with Progress(
        TextColumn(f"[bold]{attack}[/bold] eps {{task.fields[eps]}}"), BarColumn(), MofNCompleteColumn(),
        TimeRemainingColumn(), console=console, transient=True,
    ) as bar:
        task = bar.add_task("attack", total=total, eps="")
        order = {e: i for i, e in enumerate(eps_list)}

        def progress(e, done, n):
            bar.update(task, completed=done if once else order[e] * n + done, eps="all" if once else f"{e:g}")

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
        # every example, so the grid can show ones that were correct before the attack
        fig = adversarial_grid(result.x, result.adv[eps], result.y, result.clean_pred, result.adv_pred[eps],
                               n=cfg["grid"], eps=eps, title=f"{attack}, eps = {eps:g} ({cfg['norm']})")
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
