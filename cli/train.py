"""``gradlab train``: train a model and record everything in a run folder."""

from __future__ import annotations

import sys
from typing import List, Optional

import typer
from typing_extensions import Annotated

from gradlab_cli._common import (
    ConfigOpt,
    DeviceOpt,
    NameOpt,
    QuietOpt,
    RunsDirOpt,
    SeedOpt,
    TrustCodeOpt,
    console,
    err_console,
    finish_and_print,
    is_rank0,
    resolve_command,
    start_run,
)
from gradlab_cli._options import with_flags

MODEL = "Model"
DATA = "Data"
OPT = "Optimizer"
TRAIN = "Training"
PROBES = "Probes during training"
ADV = "Adversarial training"
# Panels of the training options that are not about the training run itself.
_PANELS = {"model": MODEL, "dataset": DATA, "data_dir": DATA, "opt": OPT, "schedule": OPT,
           "hessian_every": PROBES, "probe_every": PROBES, "probe": PROBES,
           "adv": ADV, "adv_eps": ADV, "adv_ratio": ADV}


def parse_set(items: Optional[List[str]]) -> dict:
    """``--set key=value`` pairs; values read as YAML scalars (``0.5``, ``1e-3``, ``true``,
    ``spirals``); names and values are checked with everything else."""
    import yaml

    from gradlab.core.config import yaml_value
    from gradlab.core.errors import GradlabError

    out = {}
    for item in items or []:
        if "=" not in item:
            raise GradlabError(f"invalid --set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        try:
            out[k.strip().replace("-", "_")] = yaml_value(v)
        except yaml.YAMLError:
            raise GradlabError(f"invalid --set {item!r}: cannot read the value") from None
    return out


def train_slots():
    """The plug-ins a train config chooses, by their torch-free declarations (the manifest), so
    every name and number is checked before torch or any data is loaded."""
    from gradlab.core.config import Slot
    from gradlab.core.manifest import registry_view
    from gradlab.core.options import Options

    models = registry_view("models")
    # a user model (package.module:factory) takes the zoo's common options
    zoo = Options(*(owners[0][1] for owners in models.declarations().values()))
    return [Slot("model", models, options_for=lambda _name: zoo), Slot("dataset", registry_view("datasets")),
            Slot("opt", registry_view("optimizers"))]


def _flag_groups():
    from gradlab.core.manifest import registry_view
    from gradlab.training.options import TRAIN_OPTIONS

    return ((TRAIN, TRAIN_OPTIONS), (MODEL, registry_view("models")), (DATA, registry_view("datasets")),
            (OPT, registry_view("optimizers")))


@with_flags(*_flag_groups(), panels=_PANELS)
def command(
    set_: Annotated[Optional[List[str]], typer.Option("--set", help="Any config key (repeatable), e.g. --set max_train=500, --set kind=spirals, --set hessian_power=0.5; checked like the flags.")] = None,
    resume: Annotated[Optional[str], typer.Option(help="Continue a run from its checkpoints/last.pt (run folder or id).")] = None,
    runs_dir: RunsDirOpt = None,
    name: NameOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
    trust_code: TrustCodeOpt = False,
    *,
    flags: dict,
) -> None:
    """Train a model; log per-step loss, learning rate and gradient norm, per-epoch accuracy."""
    from gradlab.training.options import TRAIN_OPTIONS, validate_train_config

    flags = dict(flags, runs_dir=runs_dir, name=name, seed=seed, device=device)
    sets = parse_set(set_)
    rank0 = is_rank0()
    if resume is None:  # names and numbers checked before torch is imported
        cfg = resolve_command(TRAIN_OPTIONS, config, flags, slots=train_slots(), sets=sets, command="train")
    from gradlab.runs import RunDir
    from gradlab.training.loop import Trainer

    if resume is not None:
        from gradlab.training.load import open_resume, resume_trainer

        point = open_resume(resume, runs_dir or "runs", trust_code)  # every record checked first
        cfg, path = point.config, point.path
        trainer = resume_trainer(point)
        run = RunDir.reopen(path, point.checkpoint["step"]) if rank0 else RunDir(path, "train", enabled=False)
    else:
        validate_train_config(cfg)  # what needs more than one value: the --probe spec
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
    from gradlab.training.experiment import hparams_of

    run.log_hparams(*hparams_of(cfg, result.metrics))  # every declared option, for TensorBoard's HParams
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
