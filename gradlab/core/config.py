"""Configuration files: safe YAML loading and resolution of defaults < file < flags."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from gradlab.core.errors import GradlabError


_LOADER = None


def _loader():
    """PyYAML's safe loader, reading ``1e-3``, ``3e4`` and ``1.0e6`` as numbers (YAML 1.2 does;
    PyYAML's YAML 1.1 rules need a dot and a signed exponent, so it reads them as strings)."""
    global _LOADER
    if _LOADER is None:
        import re

        import yaml

        class Loader(yaml.SafeLoader):
            pass

        Loader.add_implicit_resolver(
            "tag:yaml.org,2002:float",
            re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
            list("-+0123456789."),
        )
        _LOADER = Loader
    return _LOADER


def yaml_value(text: str) -> Any:
    """One scalar as a YAML file would read it (``0.5``, ``1e-3``, ``true``, ``spirals``)."""
    import yaml

    return yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: str | Path) -> dict:
    """Load a YAML mapping with the safe loader; one clear error naming the file otherwise."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise GradlabError(f"config file not found: {p}")
    try:
        data = yaml.load(p.read_text(), Loader=_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise GradlabError(f"malformed YAML in {p}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise GradlabError(f"{p}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def normalise_keys(cfg: Mapping[str, Any]) -> dict:
    """Accept both ``batch-size`` (flag spelling) and ``batch_size`` in files."""
    return {str(k).replace("-", "_"): v for k, v in cfg.items()}


def resolve(defaults: Mapping[str, Any], file_cfg: Mapping[str, Any] | None, flags: Mapping[str, Any]) -> dict:
    """Merge ``defaults`` < ``file_cfg`` < ``flags`` (flags set to None count as not given).

    Unknown keys in the file or flags raise :class:`GradlabError` listing the valid ones.
    """
    out = dict(defaults)
    for source, where in ((normalise_keys(file_cfg or {}), "config file"), (normalise_keys(flags), "options")):
        unknown = sorted(set(source) - set(defaults))
        if unknown:
            raise GradlabError(
                f"unknown key{'s' if len(unknown) > 1 else ''} in {where}: {', '.join(unknown)}; "
                f"valid keys: {', '.join(sorted(defaults))}"
            )
        out.update({k: v for k, v in source.items() if v is not None})
    return out


# -- a command's configuration: its own options plus the options of the plug-ins it chose ------
@dataclass(frozen=True)
class Slot:
    """A plug-in choice inside a command's configuration, e.g. the optimizer of ``train``.

    ``key`` is the config key that names the choice (``"opt"``); ``registry`` holds the choices.
    ``options_for(name)`` may replace the registry's declarations for names it does not hold
    (a user model ``package.module:factory`` takes the zoo's common options).
    """

    key: str
    registry: Any
    options_for: Optional[Callable[[str], Any]] = None

    def options(self, name: str):
        if self.options_for is not None and name not in self.registry:
            return self.options_for(name)
        return self.registry.entry(name).options


def merge_sources(sources: Sequence[tuple[str, Mapping[str, Any]]]) -> tuple[dict, dict]:
    """Layer ``[(where, values), ...]`` from lowest to highest precedence (``None``: not given).

    Returns the merged values and, per key, where its value came from (``"in run.yaml"``,
    ``"in --set"``, ``""`` for a typed flag), so a message can say which source was wrong.
    """
    merged: dict = {}
    origin: dict = {}
    for where, values in sources:
        for k, v in normalise_keys(values or {}).items():
            if v is None:
                continue
            merged[k], origin[k] = v, where
    return merged, origin


def resolve_config(own, slots: Sequence[Slot], sources: Sequence[tuple[str, Mapping[str, Any]]],
                   *, command: str = "") -> dict:
    """The full configuration of a command: every option with its checked value.

    Args:
        own: the command's own :class:`~gradlab.core.options.Options` (it declares the slot keys,
            e.g. ``opt``, as ``str`` options).
        slots: the plug-ins the command chooses; each chosen plug-in's options are resolved from
            the same flat keys (``lr`` goes to the optimizer chosen by ``opt``).
        sources: ``[(where, values), ...]``, lowest precedence first (defaults come from the
            declarations): e.g. ``[("in exp.yaml", file), ("in --set", sets), ("", flags)]``.
    Returns:
        One flat dict: the command's options, then each slot's plug-in options, in order.
    Raises:
        GradlabError: one line for the first mistake: a bad value (naming its source), an unknown
            plug-in name, a key that belongs to another plug-in ("'hessian_power' is an option of
            optimizer adahessian, not of optimizer adam"), or an unknown key with a "did you mean".
    """
    from gradlab.core.options import check_keys

    merged, origin = merge_sources(sources)
    out = own.resolve({k: v for k, v in merged.items() if k in own}, where=origin)
    claimed = set(own.names())
    chosen = []
    for slot in slots:
        name = out[slot.key]
        opts = slot.options(name)
        label = f"{slot.registry.kind} {name}"
        mine = {k: v for k, v in merged.items() if k in opts}
        for k, v in opts.resolve(mine, owner=label, where=origin).items():
            out.setdefault(k, v)
        claimed.update(opts.names())
        chosen.append((slot, name, label))
    leftover = [k for k in merged if k not in claimed]
    if leftover:
        key, where = leftover[0], origin.get(leftover[0], "")
        for slot, name, label in chosen:  # another plug-in's key: the same line as the Python API's
            theirs = slot.registry.options_of_others(name)
            if any(key in opts for opts in theirs.values()):
                check_keys([key], slot.options(name).names(), owner=label, where=where, others=theirs)
        check_keys([key], sorted(claimed), where=where, command=True)
    return out
