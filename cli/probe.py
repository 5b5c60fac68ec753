"""``gradlab probe NAME``: the probe commands."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    help="Probe a trained run or a fresh model: gradients, Jacobian spectra, Hessian, landscape.",
    no_args_is_help=True,
)

for _name in ("gradnorm", "landscape", "jacobian", "hessian"):
    app.command(_name)(importlib.import_module(f"gradlab_cli.probe_{_name}").command)
