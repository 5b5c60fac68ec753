"""``gradlab list KIND [NAME]``: what the registries hold, with each entry's declared options."""

from __future__ import annotations

from enum import Enum
from typing import Optional

import typer
from typing_extensions import Annotated

from gradlab_cli._common import console

WIDTH = 80  # wrapped to fit a classic terminal, or the terminal when it is narrower


class Kind(str, Enum):
    models = "models"
    datasets = "datasets"
    optimizers = "optimizers"
    probes = "probes"
    attacks = "attacks"


def command(
    kind: Annotated[Kind, typer.Argument(help="Which registry to list.")],
    name: Annotated[Optional[str], typer.Argument(help="One entry: every option with its type, range, default and help.",
                                                  show_default=False)] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the options as a Markdown reference "
                                           "(what docs/OPTIONS.md is made of).")] = False,
) -> None:
    """List models, datasets, optimizers, probes or attacks with a one-line description and options."""
    from gradlab.core.manifest import real_registry

    registry = real_registry(kind.value)
    entries = list(registry) if name is None else [registry.entry(name)]
    if markdown:
        print(markdown_reference(kind.value, entries), end="")
    elif name is None:
        console.print(summary_table(registry, kind.value))
    else:
        console.print(entry_table(entries[0]))


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def options_markdown(options) -> str:
    """One Markdown table of declared options: flag, accepted values, default, help (paper)."""
    rows = ["| option | accepts | default | help |", "|---|---|---|---|"]
    for o in options:
        accepts = o.describe_range() + (" or unset" if o.accepts_none else "")
        help_ = o.help + (f" ({o.paper})" if o.paper else "")
        rows.append(f"| `{o.flag}` | {_cell(accepts)} | {_cell(o.default_text() or '-')} | {_cell(help_)} |")
    return "\n".join(rows) + "\n"


def markdown_reference(title: str, entries) -> str:
    """A Markdown section per entry: its description, paper and options."""
    out = [f"## {title}\n"]
    for e in entries:
        out.append(f"### `{e.name}`\n\n{_described(e)}\n")
        out.append(options_markdown(e.options) if len(e.options) else "No options.\n")
    return "\n".join(out) + "\n"


def _width() -> int:
    return min(console.width, WIDTH)


def _described(entry) -> str:
    paper = f" ({entry.paper})" if entry.paper and entry.paper not in entry.description else ""
    return entry.description + paper


def option_defaults(entry) -> str:
    """``depth=2 width=128 act=relu ...``: the entry's options with their defaults, as ``--set``
    and config files spell them (an option without a default shows its name alone)."""
    if not len(entry.options):
        return ""
    return " ".join(f"{o.name}={o.default_text()}" if o.default is not None else o.name for o in entry.options)


def summary_table(registry, title: str):
    """One row per entry: its name, then its description over its options and their defaults."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"gradlab {title}", header_style="bold", box=None, width=_width(), pad_edge=False,
                  caption=f"gradlab list {title} NAME: every option of one entry", caption_justify="left")
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("description and options (defaults)")
    for entry in registry:
        cell = Text(_described(entry))
        options = option_defaults(entry)
        if options:
            cell.append("\n" + options, style="dim")
        table.add_row(entry.name, cell)
    return table


def entry_table(entry):
    """Every declared option of one entry: flag, what it accepts, default, help and paper."""
    from rich.table import Table

    table = Table(title=f"{entry.name}: {_described(entry)}", title_justify="left", header_style="bold",
                  box=None, width=_width(), pad_edge=False)
    for col in ("option", "accepts", "default", "help"):
        table.add_column(col, no_wrap=col == "option")
    for o in entry.options:
        accepts = o.describe_range() + (" or unset" if o.accepts_none else "")
        help_ = o.help + (f" ({o.paper})" if o.paper else "")
        table.add_row(o.flag, accepts, o.default_text() or "-", help_)
    if not len(entry.options):
        table.add_row("(none)", "", "", "")
    return table
