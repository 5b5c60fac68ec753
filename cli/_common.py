"""Options, rendering and run handling shared by every command."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping, Optional

import typer
from rich.console import Console
from rich.table import Table
from typing_extensions import Annotated

# Piped or captured output gets wide tables instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

RUN_PANEL = "Run folder"

# Options every run-making command takes beside the declared run options (runs_dir, name, seed,
# device: gradlab.runs.options, flags made by with_flags). They default to None so that a value
# from --config is only overridden by a flag the user actually typed.
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="YAML file with the same keys as the flags; flags win.", rich_help_panel=RUN_PANEL)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables; still prints the run path.", rich_help_panel=RUN_PANEL)]
# Every command that rebuilds a model from a run folder (gradlab.runs.trust says why).
TrustCodeOpt = Annotated[bool, typer.Option("--trust-code", help="Import the user model (package.module:factory) that a run folder's config.yaml names even if you did not create that run with it: importing runs its code.", rich_help_panel=RUN_PANEL)]
RunRefOpt = Annotated[Optional[str], typer.Option("--run", help="Source run: a run folder, a run id under --runs-dir, or 'last' (the newest).")]


def run_options():
    """The options of every run-making command (:data:`gradlab.runs.options.RUN_OPTIONS`); a
    command gets their flags with ``with_flags((RUN_PANEL, run_options()), ...)``."""
    from gradlab.runs.options import RUN_OPTIONS

    return RUN_OPTIONS


def resolve_command(own, config_file: Optional[Path], flags: Mapping[str, Any], *, slots=(),
                    sets: Optional[Mapping[str, Any]] = None, command: str = "") -> dict:
    """A command's checked configuration: its declared options (and the run options, and the
    options of the plug-ins its ``slots`` choose) from the declarations' defaults < ``--config``
    file < ``--set`` < flags typed on the command line (None = not typed)."""
    from gradlab.core.config import load_yaml, resolve_config

    file_cfg = load_yaml(config_file) if config_file is not None else {}
    flags = {k: (str(v) if isinstance(v, Path) else v) for k, v in flags.items()}
    sources = [("in config file", file_cfg), ("in --set", dict(sets or {})), ("", flags)]
    return resolve_config(run_options() + own, list(slots), sources, command=command)


def is_rank0() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


@contextmanager
def distributed(device_type: str):
    """Join torchrun's process group for a command (a no-op for one process), yield its
    :class:`~gradlab.core.distributed.DistInfo`, and leave it at the end (:func:`rank_failures`)."""
    from gradlab.core.distributed import init_from_env

    info = init_from_env(device_type)
    with rank_failures():
        yield info


@contextmanager
def rank_failures():
    """Leave the process group (if any) at the end; a collective that fails because another
    rank exited ends this rank with one line naming it (exit 1), no traceback. Imports torch only
    where a group may exist, so that a typo is still answered without it."""
    try:
        yield
    except RuntimeError as exc:
        from gradlab.core.distributed import current, rank_failure_message

        message = rank_failure_message(exc, current(), kept="its run folder (rank 0's) is marked failed")
        if message is None:
            raise
        err_console.print(f"gradlab: {message}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    finally:
        if "gradlab.core.distributed" in sys.modules:  # else no process group was ever joined
            from gradlab.core.distributed import current, shutdown

            shutdown(current())


def start_run(command: str, cfg: Mapping[str, Any], enabled: bool = True):
    """Create the run folder for ``command`` from a resolved config (validated beforehand)."""
    from gradlab.runs.folder import RunDir

    run = RunDir.create(cfg["runs_dir"], command, cfg.get("name"), cfg, argv=sys.argv, enabled=enabled)
    try:
        attach_loggers(run, cfg)
    except BaseException:  # the tracking store cannot be used: a usage error, no run folder
        import shutil

        shutil.rmtree(run.path, ignore_errors=True)
        raise
    return run


def attach_loggers(run, cfg: Mapping[str, Any]) -> None:
    """The mirrors of a run folder that ``--logger`` asks for (an MLflow run)."""
    if not run.enabled or cfg.get("logger", "tensorboard") != "mlflow":
        return
    import logging

    from gradlab.runs.mlflow_sink import MLflowSink

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines about creating tables
    logging.getLogger("alembic").setLevel(logging.WARNING)
    run.attach(MLflowSink.start(run.path, run.command, cfg, uri=cfg.get("mlflow_uri")))


def report_sink_errors(run) -> None:
    """One stderr line per mirror that stopped during the run (the run folder is complete)."""
    for message in getattr(run, "sink_errors", []):
        err_console.print(f"gradlab: note: {message}", highlight=False, soft_wrap=True)


def finish_and_print(run, status: str = "completed", metrics: Optional[Mapping[str, Any]] = None) -> None:
    """Write summary.csv and print ``run: <path>``: the last line of every run-making command."""
    run.finish(status, metrics)
    report_sink_errors(run)
    if run.enabled:
        print(f"run: {run.path}", flush=True)


def report_write_error(exc: BaseException, folder) -> None:
    """One stderr line for a write into the runs folder that failed (disk full, read-only,
    permissions; :func:`gradlab.runs.write_errors.write_error_message`); re-raise anything else."""
    from gradlab.runs.write_errors import write_error_message

    message = write_error_message(exc, Path(folder))
    if message is None:
        raise exc
    err_console.print(f"gradlab: {message}", highlight=False, soft_wrap=True)


def render_table(df, title: Optional[str] = None, quiet: bool = False, float_fmt: str = "{:.4g}") -> None:
    """Print a DataFrame as a rich table."""
    if quiet:
        return
    table = Table(title=title, header_style="bold")
    for i, col in enumerate(df.columns):
        # The first column identifies the row (a run id, a layer): never cut it short.
        table.add_column(str(col), justify="right" if df[col].dtype.kind in "fiu" else "left", no_wrap=i == 0)
    for row in df.itertuples(index=False):
        cells = []
        for v in row:
            if isinstance(v, float):
                cells.append("" if v != v else float_fmt.format(v))
            else:
                cells.append("" if v is None else str(v))
        table.add_row(*cells)
    console.print(table)


def parse_float_list(text: str, what: str) -> list[float]:
    """``"0,0.01,0.03"`` -> floats (:func:`gradlab.core.options.parse_numbers`)."""
    from gradlab.core.options import parse_numbers

    return parse_numbers(text, what)
