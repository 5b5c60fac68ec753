"""The registries' declarations, readable without importing the plug-ins (and so torch).

A command's ``--help`` lists flags made from every plug-in's options, and a typo in a name or a
number should be answered before torch is loaded (about two seconds). The plug-in modules import
torch, so their declarations are written once to a cache file, a JSON *manifest*, the first time
they are imported, and read from it afterwards. The manifest is derived data: its file name holds
a key of the gradlab version and the size and modification time of every module of the package,
so any edit makes a new one, and a missing, stale or unreadable manifest only means the plug-ins
are imported once more, in a fresh process (so that nothing registered at run time gets into
it). A process that has imported a registry already reads it directly.

    >>> view = registry_view("optimizers")          # doctest: +SKIP
    >>> view.entry("adam").options["lr"].default    # doctest: +SKIP
    0.001

The cache folder is ``$GRADLAB_CACHE``, else ``$XDG_CACHE_HOME/gradlab``, else
``~/.cache/gradlab``; a folder that cannot be written is skipped silently (every call then
imports the plug-ins, which is slower but correct).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import Optional

from gradlab.core.options import Option, Options
from gradlab.core.registry import Registry

# kind -> (module, registry attribute). Importing the module registers every entry.
REGISTRIES = {
    "models": ("gradlab.models", "MODELS"),
    "datasets": ("gradlab.data", "DATASETS"),
    "optimizers": ("gradlab.optim", "OPTIMIZERS"),
    "probes": ("gradlab.probes", "PROBES"),
    "attacks": ("gradlab.attacks", "ATTACKS"),
    "functions": ("gradlab.landscape.functions", "FUNCTIONS"),
}
_KIND_NAMES = {"int": int, "float": float, "bool": bool, "str": str, "tuple": tuple}
_FORMAT = 2
_loaded: dict = {}


def real_registry(kind: str):
    """The registry itself (imports its plug-ins)."""
    module, attr = REGISTRIES[kind]
    return getattr(importlib.import_module(module), attr)


def cache_dir() -> Path:
    if os.environ.get("GRADLAB_CACHE"):
        return Path(os.environ["GRADLAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gradlab"


def _key() -> str:
    """A digest of the version and of every module file's size and mtime."""
    from gradlab import __version__

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha1(f"{_FORMAT}:{__version__}:{root}".encode())
    for p in sorted(root.rglob("*.py")):
        st = p.stat()
        h.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _option_to_json(o: Option) -> dict:
    d = {f: getattr(o, f) for f in ("name", "default", "help", "low", "high", "low_open", "high_open",
                                    "choices", "length", "paper", "nullable", "finite")}
    d["kind"], d["item"] = o.kind.__name__, o.item.__name__
    return d


def _option_from_json(d: dict) -> Option:
    d = dict(d)
    d["kind"], d["item"] = _KIND_NAMES[d["kind"]], _KIND_NAMES[d["item"]]
    if d["choices"] is not None:
        d["choices"] = tuple(d["choices"])
    if d["kind"] is tuple and d["default"] is not None:
        d["default"] = tuple(d["default"])
    return Option(**d)


def _extra_to_json(value):
    return {"options": [_option_to_json(o) for o in value]} if isinstance(value, Options) else value


def _extra_from_json(value):
    if isinstance(value, dict) and set(value) == {"options"}:
        return Options(*(_option_from_json(o) for o in value["options"]))
    return value


def _dump(kinds) -> dict:
    """Each registry's entries: name, description, paper, options, and what the registry's
    ``manifest_extra(entry)`` adds (JSON values or Options), e.g. a probe's model-source options."""
    doc = {}
    for kind in kinds:
        reg = real_registry(kind)
        extra = getattr(reg, "manifest_extra", None)
        doc[kind] = {"kind": reg.kind, "entries": [
            {"name": e.name, "description": e.description, "paper": e.paper,
             "options": [_option_to_json(o) for o in e.options],
             **({"extra": {k: _extra_to_json(v) for k, v in extra(e).items()}} if extra else {})} for e in reg]}
    return doc


def write_manifest(path: str | Path) -> None:
    """Import every registry and write their declarations to ``path`` (a temporary file and a
    rename: a concurrent reader never sees half a manifest). Run in a fresh process (see
    :func:`_read_or_build`), so that no plug-in registered at run time gets into it."""
    path = Path(path)
    doc = _dump(REGISTRIES)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def _read(path: Path) -> Optional[dict]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and set(doc) == set(REGISTRIES) else None


def _read_or_build() -> dict:
    key = _key()
    if key in _loaded:
        return _loaded[key]
    path = cache_dir() / f"manifest-{key}.json"
    doc = _read(path)
    if doc is None:
        import subprocess
        import sys

        code = f"from gradlab.core.manifest import write_manifest; write_manifest({str(path)!r})"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        doc = _read(path) if done.returncode == 0 else None
        if doc is None:  # the cache cannot be written: this process imports the plug-ins itself
            doc = _dump(REGISTRIES)
    _loaded[key] = doc
    return doc


def _live(kind: str) -> bool:
    """Whether this process has imported registry ``kind`` already: then it is read directly,
    with whatever was registered at run time (a user's plug-in, a test's toy)."""
    import sys

    module, attr = REGISTRIES[kind]
    if module not in sys.modules:
        return False
    loaded = getattr(getattr(sys.modules[module], attr, None), "loaded", None)  # a lazy registry says
    return loaded is None or loaded()


class EntryView:
    """What :class:`gradlab.core.registry.Entry` says about a plug-in, without the object."""

    def __init__(self, d: dict):
        self.name, self.description, self.paper = d["name"], d["description"], d["paper"]
        self.options = Options(*(_option_from_json(o) for o in d["options"]))
        self.extra = {k: _extra_from_json(v) for k, v in d.get("extra", {}).items()}

    @property
    def option_flags(self) -> str:
        return " ".join(o.flag for o in self.options)


class RegistryView(Registry):
    """A torch-free stand-in for a registry: names, descriptions and declarations only (every
    method of :class:`~gradlab.core.registry.Registry` but ``get``: building needs the real one).
    An unknown name gets Registry's own line from these declarations, so a typo is answered
    without importing the plug-ins and torch."""

    def __init__(self, kind: str, doc: dict):
        super().__init__(doc["kind"])
        self.registry_kind = kind
        self._entries = {d["name"]: EntryView(d) for d in doc["entries"]}

    def get(self, name: str):
        raise TypeError("a RegistryView holds declarations only: build from the real registry")


def registry_view(kind: str) -> RegistryView:
    """The declarations of registry ``kind`` (``"optimizers"``, ...) from the manifest."""
    if kind not in REGISTRIES:
        raise KeyError(f"no registry {kind!r}; known: {', '.join(REGISTRIES)}")
    if _live(kind):
        return RegistryView(kind, _dump([kind])[kind])
    return RegistryView(kind, _read_or_build()[kind])


__all__ = ["REGISTRIES", "EntryView", "RegistryView", "cache_dir", "real_registry", "registry_view", "write_manifest"]
