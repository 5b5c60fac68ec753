"""``gradlab runs``: every run under a runs folder, one table per command, readable at 80 columns.

Each command's table shows its headline columns (:data:`gradlab.runs.table.HEADLINES`), or the
ones ``--columns`` names. Numbers are never cut: their columns keep their full width and text
columns (run ids, model names, verdicts) wrap instead. A damaged run is listed as ``corrupt``
and named on stderr with the file and what is wrong; ``--csv`` writes every column of every run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from gradlab_cli._common import console, err_console


def command(
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Folder that holds run folders.")] = Path("runs"),
    command_filter: Annotated[Optional[str], typer.Option("--command", help="Only runs of this command (train, probe-hessian, attack, ...).")] = None,
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Also write the combined table (every column) to this CSV file.")] = None,
    columns: Annotated[Optional[str], typer.Option("--columns", help="Comma-separated columns to show after run_id, e.g. model,opt,test_acc,seconds (default: each command's headline columns).")] = None,
    all_columns: Annotated[bool, typer.Option("--all", help="Show every summary column, not just the headline ones.")] = False,
) -> None:
    """List runs: id, command, model, dataset, optimizer, status and key final metrics."""
    from gradlab.runs.table import columns_for, runs_table

    df = runs_table(runs_dir)
    if command_filter:
        df = df[df["command"] == command_filter]
    waiting = _sweep_jobs(runs_dir)
    if df.empty:
        if not waiting:
            console.print(f"no runs under {runs_dir}")
        return
    chosen = _parse_columns(columns, df)
    if csv is not None:
        df.to_csv(csv, index=False)
    out = _console()
    for cmd, group in _groups(df):
        group = group.dropna(axis=1, how="all")
        if all_columns:
            shown = ["run_id"] + [c for c in group.columns if c not in ("run_id", "command", "problem")]
        else:
            shown = columns_for(group, cmd, chosen)
        # crop=False: where the numbers need more than the width, the lines get longer, not cut
        out.print(fit_table(group[shown], title=f"{cmd or 'unknown'} runs in {runs_dir}", width=out.width), crop=False)
        out.print()
    for row in df[df["status"] == "corrupt"].itertuples(index=False):
        problem = getattr(row, "problem", "")
        err_console.print(f"gradlab: note: run {row.run_id} is corrupt: {problem}", highlight=False, soft_wrap=True)
    if csv is not None:
        console.print(f"wrote {csv}")


def _sweep_jobs(runs_dir: Path) -> int:
    """The queued and running jobs of the sweeps submitted into ``runs_dir`` (``gradlab run
    --launcher slurm --detach``), one table; how many there are."""
    import pandas as pd

    from gradlab.training.launch import sweep_jobs

    jobs = pd.DataFrame(sweep_jobs(runs_dir), columns=["sweep", "job_id", "what", "state", "path"])
    waiting = jobs[jobs["state"].isin(["queued", "running"])]
    if not waiting.empty:
        from rich.markup import escape

        waiting = waiting.assign(what=waiting["what"].map(escape))
        out = _console()
        ended = len(jobs) - len(waiting)
        title = f"sweep jobs not ended in {runs_dir} ({ended:,} of {len(jobs):,} ended)"
        out.print(fit_table(waiting[["job_id", "what", "state", "sweep"]], title=title, width=out.width), crop=False)
        out.print()
    return len(waiting)


def _parse_columns(text: Optional[str], df) -> Optional[list]:
    from gradlab.core.errors import GradlabError

    if text is None:
        return None
    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c not in df.columns]
    if not names or unknown:
        raise GradlabError(f"unknown column {(unknown or [text])[0]!r} for --columns; choose from: "
                           f"{', '.join(c for c in df.columns if c != 'problem')}")
    return names


def _groups(df):
    """``(command, rows)`` in the order each command first appears (oldest run first)."""
    cmds = df["command"].astype(object).where(df["command"].notna(), "")  # "": config.yaml unreadable
    return [(c, df[cmds == c]) for c in dict.fromkeys(cmds.tolist())]


def _console():
    """The terminal's width on a terminal; ``$COLUMNS`` if set; else wide (piped output)."""
    from rich.console import Console

    if os.environ.get("COLUMNS", "").isdigit():
        return Console(width=int(os.environ["COLUMNS"]))
    return Console(width=None if sys.stdout.isatty() else 200)


def _cell(v) -> str:
    """A table cell: whole numbers in full (a float column holds the ints of runs beside runs
    without that column), others to 4 significant digits, without an exponent below 1e9."""
    if v is None or (isinstance(v, float) and v != v):
        return ""
    if isinstance(v, float):
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        return f"{v:.0f}" if 1e4 <= abs(v) < 1e9 else f"{v:.4g}"
    return str(v)


def fit_table(df, title: str, width: int):
    """A rich table of ``df`` within ``width`` columns where it can be: number columns keep the
    width of their longest value (never cut), and so does ``status``; the widest other text
    column gives way first, down to its header's width (at least 8), and folds its long values
    onto more lines. If that is still wider than ``width``, the table is as wide as it needs."""
    from rich import box
    from rich.table import Table

    cells = [[_cell(v) for v in row] for row in df.itertuples(index=False)]
    numeric = [df[c].dtype.kind in "fiu" for c in df.columns]
    widths = [max([len(str(c))] + [len(r[i]) for r in cells]) for i, c in enumerate(df.columns)]
    # the status, like a number, is never folded; other text down to its header's width
    floor = [w if num or c == "status" else min(w, max(len(str(c)), 8)) for w, num, c in zip(widths, numeric, df.columns)]
    room = width - 3 * (len(widths) - 1)  # per column boundary: its padding either side and the rule
    while sum(widths) > room:
        shrinkable = [i for i, w in enumerate(widths) if w > floor[i]]
        if not shrinkable:
            break
        widths[max(shrinkable, key=lambda i: widths[i])] -= 1
    need = sum(widths) + 3 * (len(widths) - 1)
    table = Table(title=title, header_style="bold", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  width=need if need > width else None)
    for i, col in enumerate(df.columns):
        table.add_column(str(col), justify="right" if numeric[i] else "left", width=widths[i],
                         overflow="fold")  # were a width ever short, a value folds: it is never cut
    for row in cells:
        table.add_row(*row)
    return table
