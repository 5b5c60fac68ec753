"""CLI flags made from the plug-ins' option declarations, so no command lists them by hand.

A command declares which option sets it takes; :func:`with_flags` adds one flag per option to
its signature (typed, with help and the real default, grouped in a help panel) and hands the
values to the command as one dict, ``flags`` (``None`` where the user typed nothing, so that a
value from ``--config`` or ``--set`` is only overridden by a flag actually typed)::

    @with_flags(("Training", TRAIN_OPTIONS), ("Optimizer", OPTIMIZERS))
    def command(config: ConfigOpt = None, *, flags: dict) -> None:
        cfg = resolve_config(TRAIN_OPTIONS, [Slot("opt", OPTIMIZERS)], [("", flags)])

Validation stays in the core (``gradlab.core.options``): the flags only carry the typed values.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional

import typer
from typing_extensions import Annotated

_PY_TYPES = {int: int, float: float, bool: bool, str: str, tuple: str}
_MAX_DEFAULTS_SHOWN = 4
_MAX_GROUPS = 3  # at most this many distinct defaults are said per value


def _declarations(source) -> dict:
    """``{name: [(owner or None, Option), ...]}`` from an Options or a Registry."""
    if hasattr(source, "declarations"):  # a Registry: the union of its entries' options
        return source.declarations()
    return {o.name: [(None, o)] for o in source}


def _grouped(owners: list, text: Callable) -> str:
    """``text(option)`` of every owner, said once per distinct value: ``"l2 for cw, deepfool; linf
    for the others"`` (the most common value last, as "the others"); one value: just that value."""
    groups: dict = {}
    for owner, o in owners:
        groups.setdefault(text(o), []).append(owner)
    if len(groups) == 1:
        return next(iter(groups))
    ordered = sorted(groups.items(), key=lambda kv: len(kv[1]))  # stable: declaration order within a size
    *rest, (common, _) = ordered
    return "; ".join([*(f"{v} for {', '.join(names)}" for v, names in rest), f"{common} for the others"])


def help_text(owners: list, kind: str = "") -> str:
    """One option's help: its sentence, its choices, who uses it and its default(s)."""
    opt = owners[0][1]
    sentence = opt.help.rstrip(".")
    parts = [sentence[:1].upper() + sentence[1:] + "."]
    if opt.kind is str and opt.choices:
        # one set of choices, or each owner's (an attack's --norm: the norms that attack supports)
        by_choices = _grouped(owners, lambda o: ", ".join(o.choices or ()))
        parts.append(f"One of: {by_choices}.")
    if opt.kind is tuple:
        parts.append(f"{opt.length} comma-separated numbers.")
    if opt.paper:
        parts.append(f"({opt.paper})")
    names = [o for o, _ in owners if o is not None]
    if names and kind:
        parts.append(f"({kind}: {', '.join(names)})")
    if len({o.help for _, o in owners}) > 1 and kind:
        parts.append(f"Its meaning differs by {kind}: `gradlab list {kind}s NAME`.")
    defaults = {o.default_text() for _, o in owners}
    if len(defaults) == 1:
        d = defaults.pop()
        if d:
            parts.append(f"(default: {d})")
    elif len(defaults) <= _MAX_GROUPS and len(owners) > len(defaults) and all(owner for owner, _ in owners):
        parts.append(f"(default: {_grouped(owners, lambda o: o.default_text() or 'own')})")
    else:
        shown = [f"{o} {d.default_text() or 'own'}" for o, d in owners[:_MAX_DEFAULTS_SHOWN]]
        more = ", ..." if len(owners) > _MAX_DEFAULTS_SHOWN else ""
        parts.append(f"(default: {', '.join(shown)}{more})")
    return " ".join(parts)


def flag_parameter(name: str, owners: list, panel: str, kind: str = "") -> inspect.Parameter:
    """A keyword-only, None-defaulting Typer parameter for one declared option."""
    opt = owners[0][1]
    kinds = {o.kind for _, o in owners}
    if len(kinds) > 1:  # one name, one meaning: caught by tests on the registries
        raise TypeError(f"option {name!r} is declared with different types: {sorted(k.__name__ for k in kinds)}")
    flag = opt.flag
    decls = [f"{flag}/--no-{flag[2:]}"] if opt.kind is bool else [flag]
    info = typer.Option(*decls, help=help_text(owners, kind), rich_help_panel=panel, show_default=False)
    annotation = Annotated[Optional[_PY_TYPES[opt.kind]], info]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)


def with_flags(*groups: tuple, skip: tuple = (), panels: Optional[dict] = None) -> Callable:
    """Decorator: a flag for every option of ``groups`` (``(panel, Options or Registry)``; a
    registry's flags are the union of its entries' options, labelled with their users). Options
    the function declares itself, or named in ``skip``, are left to the function. The function
    must take a keyword-only ``flags`` parameter. ``panels`` moves single options to another
    help panel (``{"opt": "Optimizer"}``)."""

    def deco(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "flags"]
        taken = {p.name for p in own} | set(skip)
        generated: list[inspect.Parameter] = []
        for panel, source in groups:
            kind = getattr(source, "kind", "")
            for name, owners in _declarations(source).items():
                if name in taken:
                    continue
                taken.add(name)
                shared = kind and len(owners) == len(source)  # every entry takes it: no list of users
                generated.append(flag_parameter(name, owners, (panels or {}).get(name, panel), "" if shared else kind))
        names = [p.name for p in generated]
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind is p.VAR_KEYWORD else p for p in own]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any):
            flags = {n: kwargs.pop(n, None) for n in names}
            return fn(*args, flags=flags, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=params + generated)
        wrapper.__annotations__ = {p.name: p.annotation for p in params + generated}
        wrapper.flag_names = names
        return wrapper

    return deco
