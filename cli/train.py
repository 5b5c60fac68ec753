"""``gradlab train``: train a model and record everything in a run folder."""

from __future__ import annotations

from contextlib import contextmanager
from typing import List, Optional

import typer
from typing_extensions import Annotated

from gradlab_cli._common import (
    RUN_PANEL,
    ConfigOpt,
    QuietOpt,
    TrustCodeOpt,
    attach_loggers,
    console,
    err_console,
    finish_and_print,
    is_rank0,
    report_write_error,
    resolve_command,
    run_options,
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
           "adv": ADV, "adv_eps": ADV, "adv_ratio": ADV, "adv_warmup": ADV}


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
            (OPT, registry_view("optimizers")), (RUN_PANEL, run_options()))


@with_flags(*_flag_groups(), panels=_PANELS)
def command(
    set_: Annotated[Optional[List[str]], typer.Option("--set", help="Any config key (repeatable), e.g. --set max_train=500, --set kind=spirals, --set hessian_power=0.5; checked like the flags.")] = None,
    resume: Annotated[Optional[str], typer.Option(help="Continue a run from its checkpoints/last.pt (run folder or id).")] = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
    trust_code: TrustCodeOpt = False,
    *,
    flags: dict,
) -> None:
    """Train a model; log per-step loss, learning rate and gradient norm, per-epoch accuracy."""
    from gradlab.training.options import TRAIN_OPTIONS, validate_train_config

    sets = parse_set(set_)
    rank0 = is_rank0()
    if resume is None:  # names and numbers checked before torch is imported
        cfg = resolve_command(TRAIN_OPTIONS, config, flags, slots=train_slots(), sets=sets, command="train")
    from gradlab.runs import RunDir
    from gradlab.runs.write_errors import check_writable
    from gradlab.training.loop import Trainer

    if resume is not None:
        from gradlab.training.load import open_resume, resume_trainer

        point = open_resume(resume, flags["runs_dir"] or "runs", trust_code)  # every record checked first
        cfg, path, ckpt = point.config, point.path, point.checkpoint
        trainer = resume_trainer(point)  # the checkpoint's states fit its config, even when nothing is left
        if ckpt["epoch"] >= cfg.get("epochs", TRAIN_OPTIONS["epochs"].default):  # nothing left to train
            if rank0:
                err_console.print(f"gradlab: run {path} already completed ({ckpt['epoch']} epochs, {ckpt['step']} "
                                  f"steps): nothing to resume, nothing changed", highlight=False, soft_wrap=True)
                print(f"run: {path}", flush=True)
            return
        if rank0:
            check_writable(path, "run folder")
        with _one_line_on_write_error(path):
            run = RunDir.reopen(path, ckpt["step"]) if rank0 else RunDir(path, "train", enabled=False)
        attach_loggers(run, cfg)  # the same MLflow run goes on (its id is in the folder)
    else:
        validate_train_config(cfg)  # what needs more than one value: the --probe spec
        if rank0:
            check_writable(cfg["runs_dir"])  # a read-only folder is named before any data loads
        trainer = Trainer(cfg)  # data, model and optimizer built before any folder exists
        with _one_line_on_write_error(cfg["runs_dir"]):
            run = start_run("train", cfg, enabled=rank0)

    # SIGINT/SIGTERM stay deferred until summary.csv is written: a stop asked for meanwhile (torchrun
    # stopping its workers after one died) cannot cut the run folder's last records short.
    with trainer.interrupts:
        result = _fit_with_progress(trainer, run, quiet or not rank0)
        trainer.interrupts.escalate = False  # training has stopped: a signal now waits for the summary
        code = _finish(run, cfg, result, quiet, rank0)
    if code:
        raise typer.Exit(code)


def _finish(run, cfg, result, quiet: bool, rank0: bool) -> int:
    """Write the run's last records and say how it ended; the exit code (128 + the signal
    for a run stopped by one, as a shell reports it)."""
    code = 0 if result.status == "completed" else (128 + result.signal if result.signal else 1)
    if not rank0:
        if result.message and result.status == "failed":
            err_console.print(f"gradlab: {result.message}", highlight=False, soft_wrap=True)
        run.finish(result.status, result.metrics)
        return code
    if result.status == "completed" and not quiet:
        m = result.metrics
        console.print(
            f"[bold]done[/bold]: test acc {m['test_acc']:.4f}  test loss {m['test_loss']:.4f}  "
            f"train acc {m['train_acc']:.4f}  ({m['steps']} steps, {m['seconds']:.1f} s)"
        )
    if result.message:
        err_console.print(f"gradlab: {result.message}", highlight=False, soft_wrap=True)
    from gradlab.training.experiment import hparams_of

    try:
        run.log_hparams(*hparams_of(cfg, result.metrics))  # every declared option, for TensorBoard's HParams
        finish_and_print(run, result.status, result.metrics)
    except OSError as e:
        if result.status != "failed":  # else the cause is said already; the summary could not be written
            report_write_error(e, run.path)
        print(f"run: {run.path}", flush=True)
        return code or 1
    return code


@contextmanager
def _one_line_on_write_error(folder):
    """An OSError while creating or reopening the run folder: one line and exit 1."""
    try:
        yield
    except OSError as e:
        report_write_error(e, folder)
        raise typer.Exit(1) from None


def _fit_with_progress(trainer, run, quiet: bool, out=None):
    """Train with ``epoch k/N`` progress: on a terminal a bar with the last step's loss and batch
    accuracy (blank before the first step) and, as each epoch is done, a line with its train and
    test loss and accuracy; elsewhere (a pipe, a log file) only those lines; nothing with --quiet."""
    out = out if out is not None else console
    if quiet:
        return trainer.fit(run)
    epochs = trainer.cfg["epochs"]

    def epoch_line(epoch, n, m):
        out.print(f"epoch {epoch + 1}/{n}  train loss {m['train_loss']:.4f} acc {m['train_acc']:.4f}  "
                  f"test loss {m['test_loss']:.4f} acc {m['test_acc']:.4f}", highlight=False)

    if not out.is_terminal:
        return trainer.fit(run, on_epoch=epoch_line)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]train[/bold] epoch {task.fields[epoch]}/{task.fields[epochs]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeRemainingColumn(),
        console=out,
        transient=True,
    ) as bar:
        task = bar.add_task("train", total=trainer.total_steps, completed=trainer.step,
                            epoch=min(trainer.epoch + 1, epochs), epochs=epochs, stats="")

        def progress(step, total, epoch, loss, acc):
            bar.update(task, completed=step, epoch=epoch + 1, stats=f"loss {loss:.4f}  acc {acc:.3f}")

        return trainer.fit(run, progress, epoch_line)
