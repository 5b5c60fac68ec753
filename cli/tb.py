"""``gradlab tensorboard``: TensorBoard on the runs folder."""

from __future__ import annotations

import signal
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
    from gradlab.core.errors import GradlabError

    if not runs_dir.is_dir():
        raise GradlabError(f"no runs folder {runs_dir}: run `gradlab train` first or pass --runs-dir")
    if not 0 < port < 65536:
        raise GradlabError(f"invalid port {port}")
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(runs_dir), "--host", host, "--port", str(port)]
    child = subprocess.Popen(cmd)

    def stop(signum, frame):  # SIGTERM (a supervisor, `kill`) stops the server too, as Ctrl-C does
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        code = child.wait()
    except KeyboardInterrupt:
        code = 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    raise typer.Exit(code)
