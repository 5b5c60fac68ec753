"""``gradlab tensorboard``: TensorBoard on the runs folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import typer
from typing_extensions import Annotated


def command(
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Folder that holds run folders.")] = Path("runs"),
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 keeps it on this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 6006,
) -> None:
    """Start TensorBoard on the runs folder (Ctrl-C stops it)."""
    from gradlab.errors import GradlabError

    if not runs_dir.is_dir():
        raise GradlabError(f"no runs folder {runs_dir}: run `gradlab train` first or pass --runs-dir")
    if not 0 < port < 65536:
        raise GradlabError(f"invalid port {port}")
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(runs_dir), "--host", host, "--port", str(port)]
    try:
        raise typer.Exit(subprocess.call(cmd))
    except KeyboardInterrupt:
        raise typer.Exit(0)
