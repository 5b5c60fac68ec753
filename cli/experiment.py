"""``gradlab run FILE.yaml``: run an experiment file, one run per sweep combination.

Every stage and every combination is checked before the first run starts (the same checks, and
messages, as each command's own: :mod:`gradlab_cli._checks`); a mistake is one line naming the
file, the stage, the combination and the key, and nothing runs. Then each combination runs in a
child process of its own (:mod:`gradlab_cli._child`) under one progress bar for the whole
experiment. ``--jobs N`` runs N at once on this machine; ``--launcher slurm`` sends each stage to
a cluster as a submitit job array (:mod:`gradlab_cli._sweep`, :mod:`gradlab.training.launch`).
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

from gradlab.training.launch import LAUNCHER_OPTIONS
from gradlab_cli._common import console, distributed, err_console, is_rank0, render_table
from gradlab_cli._options import with_flags

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


@with_flags(("Launcher", LAUNCHER_OPTIONS))
def command(
    file: Annotated[Path, typer.Argument(help="Experiment YAML: a base config, optional `sweep:` grid, or `steps:`.")],
    runs_dir: Annotated[Optional[Path], typer.Option("--runs-dir", help="Put every run here (overrides the file).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the file and list the runs without starting them.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help=f"Start more than {MAX_UNASKED:,} runs without asking.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Skip every combination whose run (same resolved config in its config.yaml) completed already; continue an interrupted train run from its checkpoint.")] = False,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first run that does not complete (default: go on, report at the end).")] = False,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Run this many combinations at once on this machine (CPU threads split between them, one GPU each when there are several).")] = 1,
    detach: Annotated[bool, typer.Option("--detach", help="With --launcher slurm: submit and return; `gradlab runs` shows the jobs.", rich_help_panel="Launcher")] = False,
    *,
    flags: dict,
) -> None:
    """Run each combination of an experiment file as its own run; report failures at the end."""
    from gradlab.core.errors import GradlabError
    from gradlab.training.experiment import experiment_launcher, load_experiment, runs_per_stage

    stages = load_experiment(file)
    launch = experiment_launcher(file, flags)
    if launch["launcher"] == "local" and detach:
        raise GradlabError("--detach needs a cluster launcher (--launcher slurm or submitit-local)")
    if launch["launcher"] != "local" and jobs > 1:
        raise GradlabError("--jobs is for --launcher local; a cluster runs the array's jobs at once "
                           "(--array-parallelism caps them)")
    if launch["launcher"] != "local" and _under_torchrun():
        raise GradlabError(f"under torchrun the ranks share the runs themselves: --launcher must be local, "
                           f"not {launch['launcher']} (submit `gradlab run` without torchrun instead)")
    if detach and len(stages) > 1:
        raise GradlabError(f"{file}: --detach submits one stage; this file has {len(stages)} "
                           f"(a later stage needs the runs of the one before)")
    plans = check_experiment(file, stages, runs_dir)
    counts = runs_per_stage(stages)
    total = sum(counts)
    parts = f" ({', '.join(f'step {i}: {c:,}' for i, c in enumerate(counts, 1))})" if len(counts) > 1 else ""
    if is_rank0():
        console.print(f"{file}: {total:,} run{'s' if total != 1 else ''}{parts}", highlight=False)
    if dry_run:
        if is_rank0():
            _list_runs(stages, plans)
        return
    if total > MAX_UNASKED and not yes:
        if not sys.stdin.isatty():
            raise GradlabError(f"{file} makes {total:,} runs, more than {MAX_UNASKED:,}: "
                               f"pass --yes to start them")
        if not typer.confirm(f"Start {total:,} runs?", default=False):
            raise typer.Exit(1)
    _run_all(file, stages, plans, total, resume=resume, fail_fast=fail_fast, jobs=jobs, launch=launch,
             detach=detach)


def _under_torchrun() -> bool:
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


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


def _run_all(file: Path, stages: list, plans: list, total: int, *, resume: bool, fail_fast: bool, jobs: int = 1,
             launch: Optional[dict] = None, detach: bool = False) -> None:
    import pandas as pd
    from rich.markup import escape

    from gradlab.training.experiment import PREVIOUS, EarlierRuns, log_hparams
    from gradlab_cli._checks import checker, deep_check
    from gradlab_cli._child import EXIT_CODES, Children
    from gradlab_cli._sweep import Task

    launch = launch or {"launcher": "local"}
    results, previous, n = [], [None], 0
    with distributed("cpu") as info, tempfile.TemporaryDirectory(prefix="gradlab-exp-") as tmp, \
            Children() as children, _Bar(total if info.is_main else 0) as bar:
        done = EarlierRuns() if resume else None
        if info.enabled:  # every rank has read the runs folder before any rank adds to it
            import torch.distributed as dist

            dist.barrier()
        runner = _runner(children, jobs, launch, file, plans, detach, fail_fast, info)
        cfg_dir = Path(tmp) if launch["launcher"] == "local" else runner.folder / "configs"
        cfg_dir.mkdir(exist_ok=True)
        who = f"[dim]rank {info.rank}[/dim] " if info.enabled else ""

        def on_start(task: Task) -> None:
            console.print(f"{who}[bold]{task.n}.[/bold] {escape(task.what)}"
                          + (f" (continuing {escape(task.resumed.name)})" if task.resumed else ""), highlight=False)

        for si, (stage, stage_plans) in enumerate(zip(stages, plans), 1):
            made, tasks = {}, []
            sources = previous if stage.base.get("run") == PREVIOUS else [None]
            check = checker(stage.command) if done is not None and sources != [None] else None
            for source in sources:
                for plan in stage_plans:
                    n += 1
                    cfg = dict(plan.cfg, **({"run": source} if source is not None else {}))
                    what = _what(stage, plan, source)
                    earlier = None
                    if done is not None:
                        resolved = plan.resolved or deep_check(stage.command, check(stage.args, cfg))
                        earlier = done.take("-".join(stage.command), resolved)
                        if earlier is not None and earlier[1] == "completed":
                            made[n] = str(earlier[0])
                            results.append({"#": n, "run": what, "status": "completed (earlier run)",
                                            "folder": str(earlier[0]), "error": ""})
                            bar.advance(ran=False)
                            continue
                    resumed = earlier[0] if earlier is not None else None  # an interrupted train run
                    tasks.append(Task(n, what, _argv(stage, cfg, cfg_dir / f"{n}.yaml", resumed), plan, resumed))
            try:
                for task, (status, path, err) in runner.run(tasks, on_start):
                    if children.received is not None:
                        status = "interrupted"
                    results.append({"#": task.n, "run": task.what, "status": status, "folder": path or "",
                                    "error": err})
                    bar.advance(ran=True)
                    if path:
                        made[task.n] = path
                        if stage.sweep and stage.command != ["train"]:  # a train run logs its own
                            _hparams(log_hparams, path, {k: task.plan.combo[k] for k in stage.sweep})
                    if status != "completed" and fail_fast:
                        runner.stop()
            except KeyboardInterrupt:  # only a cluster launcher's wait lets a Ctrl-C through
                runner.cancel()
                raise
            previous = [made[k] for k in sorted(made)]
            if runner.stopped or children.received is not None:
                break
        if detach:
            _detached(runner, len(tasks))
            return
    received = children.received if children.received is not None else getattr(runner, "interrupted", None)
    if not info.is_main:  # rank 0 reports the experiment; the others end with its exit code
        bad = [r for r in results if not r["status"].startswith("completed")]
        if received is not None:
            raise typer.Exit(EXIT_CODES[received])
        if bad:
            raise typer.Exit(1)
        return
    df = pd.DataFrame(sorted(results, key=lambda r: r["#"]), columns=["#", "run", "status", "folder", "error"])
    render_table(df[["#", "run", "status", "folder"]], title=f"experiment {file}")
    bad = df[~df["status"].str.startswith("completed")]
    for row in bad.itertuples(index=False):
        err_console.print(escape(f"{row[0]}. {row.run}: {row.status}" + (f": {row.error}" if row.error else "")),
                          highlight=False)
    left = total - len(df)
    if received is not None:
        err_console.print(f"gradlab: stopped by {_signal_name(received)}; {left:,} of {total:,} runs not "
                          f"started; `gradlab run {file} --resume` skips the completed ones and continues "
                          f"an interrupted train run", highlight=False)
        raise typer.Exit(EXIT_CODES[received])
    if runner.stopped and left:
        err_console.print(f"gradlab: --fail-fast: stopped at the first run that did not complete; {left:,} of "
                          f"{total:,} runs not started", highlight=False)
    if len(bad):
        raise typer.Exit(1)


def _runner(children, jobs: int, launch: dict, file: Path, plans: list, detach: bool, fail_fast: bool, info):
    """The :mod:`gradlab_cli._sweep` runner of this experiment's launcher (under torchrun: the
    ranks share the runs)."""
    from gradlab_cli._sweep import LocalRunner, RankRunner, SubmititRunner

    if launch["launcher"] == "local":
        local = LocalRunner(children, jobs, fail_fast)
        return RankRunner(local, info) if info.enabled else local
    from gradlab.training.launch import new_sweep_folder

    import shutil

    runs_dir = next((p.cfg.get("runs_dir") for stage in plans for p in stage if p.cfg.get("runs_dir")), "runs")
    folder = new_sweep_folder(Path(runs_dir).resolve(), file)
    try:
        return SubmititRunner(launch, folder, file, detach=detach)
    except BaseException:  # no cluster here: leave nothing behind
        shutil.rmtree(folder, ignore_errors=True)
        for empty in (folder.parent, folder.parent.parent):
            try:
                empty.rmdir()
            except OSError:
                break
        raise


def _detached(runner, count: int) -> None:
    console.print(f"submitted {count:,} job{'s' if count != 1 else ''} ({runner.opts['launcher']}); "
                  f"`gradlab runs` shows them; submitit's logs: {runner.folder}", highlight=False)


def _signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


def _argv(stage, cfg: dict, cfg_path: Path, resume: Optional[Path] = None) -> list:
    """The gradlab command line of one combination (``resume``: continue this interrupted train
    run from its checkpoint); its options go in a config file at ``cfg_path``."""
    import yaml

    if resume is not None:
        return ["train", "--resume", str(resume.resolve())]
    cfg = dict(cfg)
    extra = []
    if "run" in cfg and stage.command[0] in ("attack", "simplex", "probe"):
        extra = ["--run", str(cfg.pop("run"))]  # the source run is a flag of each (simplex has no key)
    cfg_path.write_text(yaml.safe_dump(cfg))
    return [*stage.command, *stage.args, *extra, "--config", str(cfg_path)]


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
