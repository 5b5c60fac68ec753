"""``gradlab runs``: one table of every run under a runs folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from gradlab_cli._common import console, render_table


def command(
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Folder that holds run folders.")] = Path("runs"),
    command_filter: Annotated[Optional[str], typer.Option("--command", help="Only runs of this command (train, probe-hessian, attack, ...).")] = None,
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Also write the combined table to this CSV file.")] = None,
    all_columns: Annotated[bool, typer.Option("--all", help="Show every summary column, not just the key ones.")] = False,
) -> None:
    """List runs: id, command, model, dataset, optimizer, status and key final metrics."""
    from gradlab.runs.table import KEY_COLUMNS, runs_table

    df = runs_table(runs_dir)
    if command_filter:
        df = df[df["command"] == command_filter]
    if df.empty:
        console.print(f"no runs under {runs_dir}")
        return
    if csv is not None:
        df.to_csv(csv, index=False)
    shown = df if all_columns else df[[c for c in KEY_COLUMNS if c in df.columns]]
    shown = shown.dropna(axis=1, how="all")
    render_table(shown, title=f"runs in {runs_dir}")
    if csv is not None:
        console.print(f"wrote {csv}")
