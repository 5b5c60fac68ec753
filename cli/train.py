"""``gradlab train``: train a model and record everything in a run folder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from gradlab.training.options import TRAIN_OPTIONS
from gradlab_cli._common import (
    ConfigOpt,
    DeviceOpt,
    NameOpt,
    QuietOpt,
    RunsDirOpt,
    SeedOpt,
    console,
    err_console,
    finish_and_print,
    is_rank0,
    resolve_options,
    start_run,
)

MODEL = "Model"
OPT = "Optimizer"
TRAIN = "Training"
PROBES = "Probes during training"
ADV = "Adversarial training"


def _help(name: str) -> str:
    """A flag's help from its declaration in TRAIN_OPTIONS, with the real default."""
    opt = TRAIN_OPTIONS[name]
    default = f" (default: {opt.default_text()})" if opt.default_text() else ""
    return f"{opt.help[0].upper()}{opt.help[1:]}.{default}"


def parse_set(items: Optional[List[str]]) -> dict:
    """``--set key=value`` pairs; values read as YAML scalars (``0.5``, ``true``, ``spirals``)."""
    import yaml

    from gradlab.core.errors import GradlabError

    out = {}
    for item in items or []:
        if "=" not in item:
            raise GradlabError(f"invalid --set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        try:
            out[k.strip().replace("-", "_")] = yaml.safe_load(v)
        except yaml.YAMLError:
            raise GradlabError(f"invalid --set {item!r}: cannot read the value") from None
    return out


def command(
    model: Annotated[Optional[str], typer.Option(help="Model name (see `gradlab list models`) or package.module:factory. (default: mlp)", rich_help_panel=MODEL)] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Dataset (see `gradlab list datasets`). (default: digits)", rich_help_panel=TRAIN)] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Folder with dataset files (else $GRADLAB_DATA, else downloads into ~/.cache/gradlab).", rich_help_panel=TRAIN)] = None,
    depth: Annotated[Optional[int], typer.Option(help="MLP hidden layers.", rich_help_panel=MODEL)] = None,
    width: Annotated[Optional[int], typer.Option(help="MLP hidden width.", rich_help_panel=MODEL)] = None,
    act: Annotated[Optional[str], typer.Option(help="Activation: relu, tanh, linear, gelu, sigmoid.", rich_help_panel=MODEL)] = None,
    init: Annotated[Optional[str], typer.Option(help="Init: default, xavier, kaiming, orthogonal, gaussian.", rich_help_panel=MODEL)] = None,
    sigma_w: Annotated[Optional[float], typer.Option(help="Gaussian init weight scale (W ~ N(0, sigma_w^2/fan_in)).", rich_help_panel=MODEL)] = None,
    sigma_b: Annotated[Optional[float], typer.Option(help="Gaussian init bias std.", rich_help_panel=MODEL)] = None,
    residual: Annotated[Optional[bool], typer.Option("--residual/--no-residual", help="Skip connections in the MLP.", rich_help_panel=MODEL)] = None,
    norm: Annotated[Optional[str], typer.Option(help="Normalisation layers: auto (ResNets: batch, else none), none, batch, layer.", rich_help_panel=MODEL)] = None,
    opt: Annotated[Optional[str], typer.Option("--opt", help="Optimizer (see `gradlab list optimizers`). (default: adam)", rich_help_panel=OPT)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate. (default: the optimizer's own)", rich_help_panel=OPT)] = None,
    momentum: Annotated[Optional[float], typer.Option(help="Momentum (momentum, nesterov, rmsprop).", rich_help_panel=OPT)] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="Weight decay.", rich_help_panel=OPT)] = None,
    schedule: Annotated[Optional[str], typer.Option(help="Learning-rate schedule: constant, cosine, step.", rich_help_panel=OPT)] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Passes over the training set. (default: 15)", rich_help_panel=TRAIN)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Global batch size (split across torchrun processes). (default: 64)", rich_help_panel=TRAIN)] = None,
    log_every: Annotated[Optional[int], typer.Option(help="Per-layer gradient histograms every N steps. (default: 50)", rich_help_panel=TRAIN)] = None,
    log_every_steps: Annotated[Optional[int], typer.Option(help=_help("log_every_steps"), rich_help_panel=TRAIN)] = None,
    checkpoint_seconds: Annotated[Optional[float], typer.Option(help=_help("checkpoint_seconds"), rich_help_panel=TRAIN)] = None,
    keep_checkpoints: Annotated[Optional[int], typer.Option(help="Keep N weight snapshots along training (for landscape PCA). (default: 0)", rich_help_panel=TRAIN)] = None,
    hessian_every: Annotated[Optional[int], typer.Option(help="Log the Hessian's lambda_max and trace every N steps (0: off).", rich_help_panel=PROBES)] = None,
    probe_every: Annotated[Optional[int], typer.Option(help="Log per-layer gradient and signal norms every N steps (0: off).", rich_help_panel=PROBES)] = None,
    probe: Annotated[Optional[str], typer.Option(help=_help("probe"), rich_help_panel=PROBES)] = None,
    adv: Annotated[Optional[str], typer.Option(help="Adversarial training with fgsm or pgd.", rich_help_panel=ADV)] = None,
    adv_eps: Annotated[Optional[float], typer.Option(help="Adversarial training budget (L-inf, pixel units). (default: 0.1)", rich_help_panel=ADV)] = None,
    adv_ratio: Annotated[Optional[float], typer.Option(help="Weight of the adversarial loss (0.5: Goodfellow et al.; 1: Madry et al.). (default: 0.5)", rich_help_panel=ADV)] = None,
    set_: Annotated[Optional[List[str]], typer.Option("--set", help="Any other config key (repeatable): e.g. --set max_train=500, --set kind=spirals, --set hessian_power=0.5, --set dropout=0.2.")] = None,
    resume: Annotated[Optional[str], typer.Option(help="Continue a run from its checkpoints/last.pt (run folder or id).")] = None,
    runs_dir: RunsDirOpt = None,
    name: NameOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Train a model; log per-step loss, learning rate and gradient norm, per-epoch accuracy."""
    from gradlab.runs import RunDir, find_run, load_checkpoint, read_config
    from gradlab.training.loop import Trainer
    from gradlab.training.options import train_defaults, validate_train_config

    flags = dict(
        model=model, dataset=dataset, data_dir=data_dir, depth=depth, width=width, act=act, init=init,
        sigma_w=sigma_w, sigma_b=sigma_b, residual=residual, norm=norm, opt=opt, lr=lr, momentum=momentum,
        weight_decay=weight_decay, schedule=schedule, epochs=epochs, batch_size=batch_size,
        log_every=log_every, log_every_steps=log_every_steps, checkpoint_seconds=checkpoint_seconds,
        keep_checkpoints=keep_checkpoints, hessian_every=hessian_every, probe_every=probe_every, probe=probe, adv=adv, adv_eps=adv_eps, adv_ratio=adv_ratio,
        runs_dir=runs_dir, name=name, seed=seed, device=device,
    )
    flags.update(parse_set(set_))
    rank0 = is_rank0()

    if resume is not None:
        path = find_run(runs_dir or "runs", resume)
        doc = read_config(path)
        from gradlab.core.errors import GradlabError

        if doc.get("command") != "train":
            raise GradlabError(f"--resume {resume}: run {path.name} is a {doc.get('command')!r} run, not a train run")
        ckpt = load_checkpoint(path / "checkpoints" / "last.pt")
        cfg = doc["config"]
        trainer = Trainer(cfg, resume=ckpt)
        run = RunDir.reopen(path, ckpt["step"]) if rank0 else RunDir(path, "train", enabled=False)
    else:
        cfg = resolve_options(train_defaults(), config, flags)
        validate_train_config(cfg)
        trainer = Trainer(cfg)  # data, model and optimizer built before any folder exists
        run = start_run("train", cfg, enabled=rank0)

    result = _fit_with_progress(trainer, run, quiet or not rank0)
    if not rank0:
        run.finish(result.status, result.metrics)
        raise typer.Exit(0 if result.status == "completed" else 1)
    if result.status == "completed" and not quiet:
        m = result.metrics
        console.print(
            f"[bold]done[/bold]: test acc {m['test_acc']:.4f}  test loss {m['test_loss']:.4f}  "
            f"train acc {m['train_acc']:.4f}  ({m['steps']} steps, {m['seconds']:.1f} s)"
        )
    if result.message:
        err_console.print(f"gradlab: {result.message}", highlight=False, soft_wrap=True)
    finish_and_print(run, result.status, result.metrics)
    if result.status != "completed":
        raise typer.Exit(130 if result.status == "interrupted" else 1)


def _fit_with_progress(trainer, run, quiet: bool):
    """Run training under a rich progress bar with live loss and accuracy (only on a terminal)."""
    if quiet or not sys.stdout.isatty():
        return trainer.fit(run)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]train[/bold] epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.3f}"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("train", total=trainer.total_steps, completed=trainer.step,
                            epoch=trainer.epoch, loss=float("nan"), acc=float("nan"))

        def progress(step, total, epoch, loss, acc):
            bar.update(task, completed=step, epoch=epoch, loss=loss, acc=acc)

        return trainer.fit(run, progress)
