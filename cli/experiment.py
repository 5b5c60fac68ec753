"""``gradlab run FILE.yaml``: run an experiment file, one run per sweep combination.

Every stage and every combination is checked before the first run starts (the same checks, and
messages, as each command's own: :mod:`gradlab_cli._checks`); a mistake is one line naming the
file, the stage, the combination and the key, and nothing runs. Then each combination runs in a
child process of its own (:mod:`gradlab_cli._child`) under one progress bar for the whole
experiment.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from gradlab_cli._common import console, err_console, render_table

#: More runs than this are started only with --yes (or a yes at the terminal's prompt).
MAX_UNASKED = 1000


@dataclass
class Planned:
    """One combination of a stage, checked: ``cfg`` is what goes into its config file,
    ``resolved`` the configuration its run will record (``None`` where the stage runs on the
    previous stage's runs: resolved again for each)."""

    combo: dict
    cfg: dict
    label: str
    resolved: Optional[dict]


def command(
    file: Annotated[Path, typer.Argument(help="Experiment YAML: a base config, optional `sweep:` grid, or `steps:`.")],
    runs_dir: Annotated[Optional[Path], typer.Option("--runs-dir", help="Put every run here (overrides the file).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the file and list the runs without starting them.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help=f"Start more than {MAX_UNASKED:,} runs without asking.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Skip every combination whose run (same resolved config in its config.yaml) completed already; continue an interrupted train run from its checkpoint.")] = False,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first run that does not complete (default: go on, report at the end).")] = False,
) -> None:
    """Run each combination of an experiment file as its own run; report failures at the end."""
    from gradlab.core.errors import GradlabError
    from gradlab.training.experiment import load_experiment, runs_per_stage

    stages = load_experiment(file)
    plans = check_experiment(file, stages, runs_dir)
    counts = runs_per_stage(stages)
    total = sum(counts)
    parts = f" ({', '.join(f'step {i}: {c:,}' for i, c in enumerate(counts, 1))})" if len(counts) > 1 else ""
    console.print(f"{file}: {total:,} run{'s' if total != 1 else ''}{parts}", highlight=False)
    if dry_run:
        _list_runs(stages, plans)
        return
    if total > MAX_UNASKED and not yes:
        if not sys.stdin.isatty():
            raise GradlabError(f"{file} makes {total:,} runs, more than {MAX_UNASKED:,}: "
                               f"pass --yes to start them")
        if not typer.confirm(f"Start {total:,} runs?", default=False):
            raise typer.Exit(1)
    _run_all(file, stages, plans, total, resume=resume, fail_fast=fail_fast)


def check_experiment(file: Path, stages: list, runs_dir: Optional[Path]) -> list[list[Planned]]:
    """Every combination of every stage, checked: names and numbers first (no torch, no data),
    then what needs the plug-ins. Raises one :class:`GradlabError` line for the first mistake,
    prefixed with the file, the step and the combination."""
    from gradlab.core.errors import GradlabError
    from gradlab.training.experiment import PREVIOUS
    from gradlab_cli._checks import checker, deep_check

    plans: list[list[Planned]] = []
    first: list[list[dict]] = []
    for si, stage in enumerate(stages, 1):
        where = f"{file}" + (f" step {si}" if len(stages) > 1 else "")
        check = _prefixed(where, lambda: checker(stage.command))
        plans.append([])
        first.append([])
        for combo in stage.combinations():
            label = stage.label(combo)
            cfg = dict(combo)
            if runs_dir is not None:
                cfg["runs_dir"] = str(runs_dir)
            if label and "name" not in cfg:
                cfg["name"] = label
            at = where + (f" ({label})" if label else "")
            first[-1].append(_prefixed(at, lambda: check(stage.args, cfg)))
            plans[-1].append(Planned(combo, cfg, label, None))
    for si, stage in enumerate(stages, 1):  # the checks that import the plug-ins, once names are right
        where = f"{file}" + (f" step {si}" if len(stages) > 1 else "")
        previous = stage.base.get("run") == PREVIOUS
        for plan, resolved in zip(plans[si - 1], first[si - 1]):
            at = where + (f" ({plan.label})" if plan.label else "")
            checked = _prefixed(at, lambda: deep_check(stage.command, resolved))
            plan.resolved = None if previous else checked
    if not any(plans):
        raise GradlabError(f"{file}: no runs")
    return plans


def _prefixed(where: str, fn):
    """``fn()``, with any :class:`GradlabError` it raises prefixed by ``where``."""
    from gradlab.core.errors import GradlabError

    try:
        return fn()
    except GradlabError as e:
        raise GradlabError(f"{where}: {e}") from None


def _what(stage, plan: Planned, source: Optional[str]) -> str:
    what = " ".join(stage.command + stage.args) + (f" [{plan.label}]" if plan.label else "")
    return what + (f" on {Path(source).name}" if source is not None else "")


def _list_runs(stages: list, plans: list) -> None:
    from rich.markup import escape

    from gradlab.training.experiment import PREVIOUS

    n = 0
    for si, (stage, stage_plans) in enumerate(zip(stages, plans), 1):
        on = f" on <each run of step {si - 1}>" if stage.base.get("run") == PREVIOUS else ""
        for plan in stage_plans:
            n += 1
            console.print(f"{n}. {escape(_what(stage, plan, None) + on)}", highlight=False)


def _run_all(file: Path, stages: list, plans: list, total: int, *, resume: bool, fail_fast: bool) -> None:
    import pandas as pd
    from rich.markup import escape

    from gradlab.training.experiment import PREVIOUS, EarlierRuns, log_hparams
    from gradlab_cli._checks import checker, deep_check
    from gradlab_cli._child import Children

    done = EarlierRuns() if resume else None
    results, previous, n, stop = [], [None], 0, False
    with tempfile.TemporaryDirectory(prefix="gradlab-exp-") as tmp, Children() as children, \
            _Bar(total) as bar:
        for si, (stage, stage_plans) in enumerate(zip(stages, plans), 1):
            made = []
            sources = previous if stage.base.get("run") == PREVIOUS else [None]
            check = checker(stage.command) if done is not None and sources != [None] else None
            for source in sources:
                for plan in stage_plans:
                    if stop or children.received is not None:
                        break
                    n += 1
                    cfg = dict(plan.cfg, **({"run": source} if source is not None else {}))
                    what = _what(stage, plan, source)
                    earlier = None
                    if done is not None:
                        resolved = plan.resolved or deep_check(stage.command, check(stage.args, cfg))
                        earlier = done.take("-".join(stage.command), resolved)
                        if earlier is not None and earlier[1] == "completed":
                            made.append(str(earlier[0]))
                            results.append({"#": n, "run": what, "status": "completed (earlier run)",
                                            "folder": str(earlier[0]), "error": ""})
                            bar.advance(ran=False)
                            continue
                    resumed = earlier[0] if earlier is not None else None  # an interrupted train run
                    console.print(f"[bold]{n}.[/bold] {escape(what)}"
                                  + (f" (continuing {escape(resumed.name)})" if resumed else ""), highlight=False)
                    status, path, err = _run_one(children, stage, cfg, Path(tmp) / f"{n}.yaml", resumed)
                    if children.received is not None:
                        status = "interrupted"
                    results.append({"#": n, "run": what, "status": status, "folder": path or "", "error": err})
                    bar.advance(ran=True)
                    if path:
                        made.append(path)
                        if stage.sweep and stage.command != ["train"]:  # a train run logs its own
                            _hparams(log_hparams, path, {k: plan.combo[k] for k in stage.sweep})
                    if status != "completed" and fail_fast:
                        stop = True
            previous = made
    df = pd.DataFrame(results, columns=["#", "run", "status", "folder", "error"])
    render_table(df[["#", "run", "status", "folder"]], title=f"experiment {file}")
    bad = df[~df["status"].str.startswith("completed")]
    for row in bad.itertuples(index=False):
        err_console.print(escape(f"{row[0]}. {row.run}: {row.status}" + (f": {row.error}" if row.error else "")),
                          highlight=False)
    left = total - len(df)
    if children.received is not None:
        err_console.print(f"gradlab: stopped by {_signal_name(children.received)}; {left:,} of {total:,} runs not "
                          f"started; `gradlab run {file} --resume` skips the completed ones and continues "
                          f"an interrupted train run", highlight=False)
        raise typer.Exit(children.exit_code)
    if stop and left:
        err_console.print(f"gradlab: --fail-fast: stopped at the first run that did not complete; {left:,} of "
                          f"{total:,} runs not started", highlight=False)
    if len(bad):
        raise typer.Exit(1)


def _signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


def _run_one(children, stage, cfg: dict, cfg_path: Path, resume: Optional[Path] = None):
    """Run one combination in its own process (``resume``: continue this interrupted train run
    from its checkpoint); ``(status, run folder or None, last error line)``."""
    import yaml

    if resume is not None:
        argv = ["train", "--resume", str(resume.resolve())]
    else:
        cfg = dict(cfg)
        extra = []
        if "run" in cfg and stage.command[0] in ("attack", "simplex", "probe"):
            extra = ["--run", str(cfg.pop("run"))]  # the source run is a flag of each (simplex has no key)
        cfg_path.write_text(yaml.safe_dump(cfg))
        argv = [*stage.command, *stage.args, *extra, "--config", str(cfg_path)]
    code, out, err = children.run([sys.executable, "-m", "gradlab", *argv, "--quiet"])
    path = None
    for line in out.splitlines():
        if line.startswith("run: "):
            path = line[5:].strip()
    err = err.strip().splitlines()[-1] if err.strip() else ""
    status = "completed" if code == 0 else "failed"
    if path:
        from gradlab.training.experiment import run_status

        status = run_status(Path(path)) or status
    return status, path, err


def _hparams(log_hparams, path: str, hparams: dict) -> None:
    import pandas as pd

    from gradlab.training.experiment import HPARAM_METRICS

    summary = Path(path) / "summary.csv"
    if not summary.is_file():
        return
    rec = pd.read_csv(summary).iloc[0].to_dict()
    metrics = {tag: float(rec[col]) for col, tag in HPARAM_METRICS.items() if col in rec and pd.notna(rec[col])}
    if metrics:
        log_hparams(path, hparams, metrics)


class _Bar:
    """One progress bar for the whole experiment, with an ETA from the pace of the runs made so
    far (:func:`gradlab.training.experiment.eta_seconds`); drawn only on a terminal."""

    def __init__(self, total: int):
        self.total, self.finished, self.ran = total, 0, 0
        self.start = time.monotonic()
        self.bar = None

    def __enter__(self) -> "_Bar":
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("[bold]experiment[/bold]"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("eta {task.fields[eta]}"), console=console,
                                transient=True)
            self.bar.start()
            self.task = self.bar.add_task("experiment", total=self.total, eta="-")
        return self

    def advance(self, ran: bool) -> None:
        from gradlab.training.experiment import eta_seconds

        self.finished += 1
        self.ran += int(ran)
        if self.bar is not None:
            left = eta_seconds(time.monotonic() - self.start, self.ran, self.total - self.finished)
            self.bar.update(self.task, completed=self.finished, eta=format_eta(left))

    def __exit__(self, *exc) -> bool:
        if self.bar is not None:
            self.bar.stop()
        return False


def format_eta(seconds: Optional[float]) -> str:
    """``1:02:03``, ``4:05``, or ``-`` before the first run has ended."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"
