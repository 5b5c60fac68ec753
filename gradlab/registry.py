"""Small registries: the extension points of gradlab.

A model, dataset, optimizer, probe or attack is one file that registers one entry::

    from gradlab.models.registry import MODELS

    @MODELS.register("mlp", "fully connected net", options="--depth --width --act")
    def build_mlp(spec, **opts): ...

``gradlab list`` reads the registries, never a hand-kept list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator

from gradlab.errors import GradlabError


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Any
    description: str
    options: str = ""


class Registry:
    """Name -> object, with a one-line description and the main options for ``gradlab list``."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Entry] = {}

    def register(self, name: str, description: str, options: str = "") -> Callable:
        def deco(obj):
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = Entry(name, obj, description, options)
            return obj

        return deco

    def add(self, name: str, obj: Any, description: str, options: str = "") -> None:
        self.register(name, description, options)(obj)

    def get(self, name: str) -> Any:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise GradlabError(
                f"unknown {self.kind} {name!r}; choose from: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)
