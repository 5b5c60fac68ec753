"""Registries: the extension points of gradlab.

A model, dataset, optimizer, probe or attack is one file that declares its options once and
registers one entry::

    from gradlab.core.options import Option, Options
    from gradlab.models.registry import MODELS

    @MODELS.register("mlp", "fully connected net", options=Options(
        Option("depth", int, 2, "hidden layers", low=1),
        Option("width", int, 128, "hidden units per layer", low=1),
    ), paper="")
    def build_mlp(spec, depth, width): ...

``gradlab list`` reads the registries, never a hand-kept list; the CLI makes its flags, and the
config resolution its checks, from each entry's :class:`~gradlab.core.options.Options`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Union

from gradlab.core.errors import GradlabError
from gradlab.core.options import Options


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Any
    description: str
    options: Options = field(default_factory=Options)
    paper: str = ""

    @property
    def option_flags(self) -> str:
        """``--depth --width ...``: the entry's options as flags, for ``gradlab list``."""
        return " ".join(o.flag for o in self.options)


class Registry:
    """Name -> object, with a one-line description, its typed options and its paper."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Entry] = {}

    def register(self, name: str, description: str, options: Union[Options, None] = None,
                 paper: str = "") -> Callable:
        if options is not None and not isinstance(options, Options):
            raise TypeError(f"{self.kind} {name!r}: options must be an Options declaration")

        def deco(obj):
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = Entry(name, obj, description, options or Options(), paper)
            return obj

        return deco

    def add(self, name: str, obj: Any, description: str, options: Union[Options, None] = None,
            paper: str = "") -> None:
        self.register(name, description, options, paper)(obj)

    def get(self, name: str) -> Any:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            close = difflib.get_close_matches(str(name), self.names(), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise GradlabError(
                f"unknown {self.kind} {name!r}; choose from: {', '.join(self.names())}{hint}"
            ) from None

    def options_of_others(self, name: str) -> dict[str, Options]:
        """``{"optimizer adahessian": Options, ...}`` for every entry but ``name``: lets a
        message say that a key belongs to another plug-in of this kind."""
        return {f"{self.kind} {n}": e.options for n, e in self._entries.items() if n != name}

    def declarations(self) -> dict[str, list[tuple[str, Any]]]:
        """``{option name: [(entry name, Option), ...]}`` over every entry: what the CLI turns
        into one flag per name (the same name may have other defaults in other entries, e.g.
        ``momentum``, but never another type)."""
        out: dict[str, list] = {}
        for e in self._entries.values():
            for o in e.options:
                out.setdefault(o.name, []).append((e.name, o))
        return out

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)
