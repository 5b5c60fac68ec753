"""``gradlab probe NAME``: one command per registered probe, made from its declaration.

Every probe goes through :func:`run_probe`: its flags come from its options (plus the shared
model-source options and the run options); :func:`gradlab.probes.runner.prepare_probe` resolves
and checks the configuration, loads the model and runs the probe's own checks, and only then is
the run folder created; the probe's :class:`~gradlab.probes.base.ProbeReport` is rendered,
written and logged here.

Commands are built on demand (:class:`_ProbeGroup`): ``gradlab probe --help`` lists the probes
from the manifest (names and descriptions) without importing torch; ``gradlab probe hessian`` imports only
the Hessian probe.
"""

from __future__ import annotations

import inspect
from typing import get_args

import typer
from typer.core import TyperCommand, TyperGroup
from typing_extensions import Annotated

from gradlab_cli._common import (ConfigOpt, QuietOpt, RUN_PANEL, TrustCodeOpt, console, err_console, finish_and_print,
                                 rank_failures, render_table, start_run)

SOURCE_PANEL = "Model source"

HELP = "Probe a trained run or a fresh model: gradients, Jacobian spectra, Hessian, landscape."


def _name_option():
    """The run-folder suffix: the one option of a probe run that only the CLI has."""
    from gradlab.core.options import Options
    from gradlab.runs.options import NAME

    return Options(NAME)


class _ProbeGroup(TyperGroup):
    """The probe commands, built when one is looked up; the help listing uses placeholders."""

    _listing = False

    def list_commands(self, ctx) -> list[str]:
        from gradlab.core.manifest import registry_view

        return registry_view("probes").names()  # from the manifest unless the probes are loaded

    def get_command(self, ctx, cmd_name: str):
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        if self._listing:  # `gradlab probe --help`: the name and its line, nothing imported
            from gradlab.core.manifest import registry_view

            return TyperCommand(cmd_name, help=registry_view("probes").entry(cmd_name).description)
        from gradlab.core.manifest import registry_view

        registry_view("probes").entry(cmd_name)  # raises: unknown probe, the choices and a "did you mean"
        sub = typer.Typer(add_completion=False)
        sub.command(cmd_name)(make_command(cmd_name))
        cmd = typer.main.get_command(sub)
        self.commands[cmd_name] = cmd
        return cmd

    def format_help(self, ctx, formatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


app = typer.Typer(help=HELP, no_args_is_help=True, cls=_ProbeGroup)


def make_command(name: str):
    """The Typer command of probe ``name``: its flags, its help, and :func:`run_probe`."""
    from gradlab.core.manifest import registry_view
    from gradlab.probes.runner import CONTEXT_OPTIONS
    from gradlab_cli._options import with_flags

    entry = registry_view("probes").entry(name)  # declarations only: a typo is answered before torch loads

    def command(config: ConfigOpt = None, quiet: QuietOpt = False, trust_code: TrustCodeOpt = False, *,
                flags: dict) -> None:
        run_probe(name, {**flags, "trust_code": trust_code or None}, config, quiet)  # None: --config may say

    command.__doc__ = "\n\n".join(p for p in (entry.description[:1].upper() + entry.description[1:] + ".",
                                              entry.extra["help"]) if p)
    wrapped = with_flags((SOURCE_PANEL, entry.extra["source_options"]), (f"{name} probe", entry.options),
                         (RUN_PANEL, CONTEXT_OPTIONS + _name_option()))(command)
    _apply_off_names(wrapped, entry.extra["off_names"])
    return wrapped


def _apply_off_names(fn, off_names: dict) -> None:
    """Give the boolean flags named in ``off_names`` their own "off" spelling (``--eval-mode``)."""
    if not off_names:
        return
    sig = inspect.signature(fn)
    params = []
    for p in sig.parameters.values():
        if p.name in off_names:
            base, info = get_args(p.annotation)[:2]
            on = "--" + p.name.replace("_", "-")
            info = typer.Option(f"{on}/{off_names[p.name]}", help=info.help, rich_help_panel=info.rich_help_panel,
                                show_default=False)
            p = p.replace(annotation=Annotated[base, info])
        params.append(p)
    fn.__signature__ = sig.replace(parameters=params)
    fn.__annotations__ = {p.name: p.annotation for p in params}


def run_probe(name: str, flags: dict, config_file, quiet: bool) -> None:
    """Resolve, load, check, then create the run folder, run the probe and write its report."""
    from gradlab.core.config import load_yaml
    from gradlab.probes.runner import prepare_probe

    sources = [("", flags)]
    if config_file is not None:
        sources.insert(0, (f"in {config_file}", load_yaml(config_file)))
    from gradlab.core.options import Options
    from gradlab.runs.trust import TRUST_CODE

    with rank_failures():  # under torchrun prepare_probe joins the process group
        prepared = prepare_probe(name, sources, extra=_name_option() + Options(TRUST_CODE))
        main = prepared.ctx.dist is None or prepared.ctx.dist.is_main
        quiet = quiet or not main
        for note in prepared.ctx.notes if main else ():
            err_console.print(f"gradlab: note: {note}", highlight=False)

        run_dir = start_run(f"probe-{name}", prepared.config, enabled=main)
        with run_dir:
            with _Progress(quiet) as bar:
                prepared.ctx.progress = bar
                report = prepared.run()
            write_report(run_dir, name, report)
            if not main:
                return
            for note in report.notes:
                err_console.print(f"gradlab: note: {note}", highlight=False)
            if not quiet:
                render_table(report.table if report.view is None else report.view, title=report.title or name)
                for title, frame in report.views:
                    render_table(frame, title=title)
            for line in report.summary_lines:
                console.print(line, highlight=False)
            finish_and_print(run_dir, "completed", {**report.metrics, **prepared.ctx.source.description})


def write_report(run_dir, name: str, report) -> None:
    """CSVs, figures, TensorBoard scalars/histograms/text and saved objects of one report."""
    from gradlab.runs import save_checkpoint

    run_dir.write_csv(f"{name}.csv", report.table)
    for stem, frame in report.tables.items():
        run_dir.write_csv(f"{stem}.csv", frame)
    if report.scalars:
        run_dir.log_metrics(0, None, report.scalar_group or name, report.scalars)
    tb = run_dir.tb
    for tag, points in report.series.items():
        for step, value in points:
            tb.add_scalar(tag, value, step)
    for tag, values in report.histograms.items():
        tb.add_histogram(tag, values, 0)
    for fig_name, fig in report.figures.items():
        run_dir.save_figure(fig, fig_name)
    texts = dict(report.text)
    if not texts and report.summary_lines:
        texts[f"{name}/summary"] = "\n\n".join(report.summary_lines)
    for tag, text in texts.items():
        run_dir.log_text(tag, text)
    if run_dir.enabled:
        for file_name, obj in report.artifacts.items():
            save_checkpoint(obj, run_dir.path / file_name)


class _Progress:
    """``progress(done, total)`` drawn as a rich bar (started at the first call; none when quiet)."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar, self.task = quiet, None, None

    def __enter__(self) -> "_Progress":
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            self.bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), console=console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("probe", total=total)
        self.bar.update(self.task, completed=done, total=total)

    def __exit__(self, *exc) -> bool:
        if self.bar is not None:
            self.bar.stop()
        return False


__all__ = ["app", "make_command", "run_probe", "write_report"]
