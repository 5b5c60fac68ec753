"""``gradlab list``: what the registries hold."""

from __future__ import annotations

from enum import Enum

import typer
from typing_extensions import Annotated

from gradlab_cli._common import console


class Kind(str, Enum):
    models = "models"
    datasets = "datasets"
    optimizers = "optimizers"
    probes = "probes"
    attacks = "attacks"


def command(kind: Annotated[Kind, typer.Argument(help="Which registry to list.")]) -> None:
    """List models, datasets, optimizers, probes or attacks with a one-line description and options."""
    import importlib

    from rich.table import Table

    module, attr = {
        Kind.models: ("gradlab.models", "MODELS"),
        Kind.datasets: ("gradlab.data", "DATASETS"),
        Kind.optimizers: ("gradlab.optim", "OPTIMIZERS"),
        Kind.probes: ("gradlab.probes", "PROBES"),
        Kind.attacks: ("gradlab.attacks", "ATTACKS"),
    }[kind]
    registry = getattr(importlib.import_module(module), attr)
    table = Table(title=f"gradlab {kind.value}", header_style="bold")
    table.add_column("name", style="bold")
    table.add_column("description")
    table.add_column("main options")
    for entry in registry:
        table.add_row(entry.name, entry.description, entry.option_flags)
    console.print(table)
