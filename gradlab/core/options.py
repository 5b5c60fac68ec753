"""Typed plug-in options: each option is declared once, and everything else comes from that.

A model, dataset, optimizer, probe or attack declares its options as one :class:`Options`
object of :class:`Option` entries (name, type, default, range or choices, help, paper) and
registers it with itself. From that one declaration come: validation with one clear line per
mistake (the same for CLI flags, ``--set``, YAML files and the Python API), the CLI flags and
their help text with the real default (``gradlab_cli._options``), ``gradlab list``, the resolved
``config.yaml`` and the TensorBoard hparams.

    >>> OPTS = Options(
    ...     Option("lr", float, 0.1, "learning rate", low=0, low_open=True),
    ...     Option("nesterov", bool, False, "Nesterov momentum"),
    ...     Option("schedule", str, "constant", "learning-rate schedule", choices=("constant", "cosine")),
    ... )
    >>> OPTS.resolve({"lr": 0.5})
    {'lr': 0.5, 'nesterov': False, 'schedule': 'constant'}
    >>> OPTS.resolve({"lr": "fast"})
    Traceback (most recent call last):
    ...
    gradlab.core.errors.GradlabError: invalid lr: 'fast' (must be a number > 0)

Why dataclasses and a small validator rather than pydantic: the rules users meet must be exactly
these and nothing looser. pydantic's lax mode turns ``"64"`` into 64 and ``True`` into 1, its
strict mode rejects ``2.0`` for an integer, and its messages span several lines; here a quoted
number is rejected everywhere (YAML, ``--set``, Python) with one line saying so, an integral
float such as YAML's ``1e3`` is an integer, and no dependency or import cost is added.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

from gradlab.core.errors import GradlabError

_KINDS = (int, float, bool, str, tuple)


@dataclass(frozen=True)
class Option:
    """One option of a plug-in.

    Args:
        name: the config key (``sigma_w``); the CLI flag is ``--sigma-w``.
        kind: ``int``, ``float``, ``bool``, ``str`` or ``tuple`` (a fixed-length tuple of
            ``item`` values, e.g. Adam's ``betas``).
        default: the value when none is given; ``None`` means "decided later" (the plug-in's own
            default, e.g. "the whole test split"), and then ``None`` is also accepted as a value.
        help: one sentence for ``--help`` and ``gradlab list`` (without the default: it is added).
        low, high: the allowed range for numbers (``None``: unbounded); ``low_open``/``high_open``
            exclude the end point. For tuples, the range of every item.
        choices: the allowed strings, for ``str`` options.
        length, item: for tuples, their length and the type of each item.
        paper: where the option (or its default) comes from, e.g. ``"Yao et al. 2021"``.
        nullable: accept ``None`` even when the default is not ``None``.
        finite: numbers must be finite (``inf`` is rejected) unless this is False.
        label: how messages name the option, when not by its key (``"batch size"``).
    """

    name: str
    kind: type
    default: Any
    help: str
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    choices: Optional[tuple] = None
    length: Optional[int] = None
    item: type = float
    paper: str = ""
    nullable: bool = False
    finite: bool = True
    label: str = ""

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise TypeError(f"option {self.name}: kind must be one of {_KINDS}, not {self.kind!r}")
        if self.kind is tuple and not self.length:
            raise TypeError(f"option {self.name}: a tuple option needs its length")
        if self.default is not None:  # a declaration's own default must pass its own checks
            object.__setattr__(self, "default", self.check(self.default))

    # -- what users see ---------------------------------------------------------------------
    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def what(self) -> str:
        """The option's name in messages."""
        return self.label or self.name

    @property
    def accepts_none(self) -> bool:
        return self.nullable or self.default is None

    def describe_range(self) -> str:
        """``a number > 0``, ``an integer >= 1``, ``one of: relu, tanh``, ``true or false``."""
        if self.kind is bool:
            return "true or false"
        if self.kind is str:
            return f"one of: {', '.join(self.choices)}" if self.choices else "text"
        base = {int: "an integer", float: "a number"}
        if self.kind is tuple:
            what = f"{self.length} {'integers' if self.item is int else 'numbers'}"
            rng = self._range_text()
            return what + (f", each {rng}" if rng else "")
        rng = self._range_text()
        return base[self.kind] + (f" {rng}" if rng else "")

    def _range_text(self) -> str:
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            return f"in {'(' if self.low_open else '['}{lo:g}, {hi:g}{')' if self.high_open else ']'}"
        if lo is not None:
            return f"{'>' if self.low_open else '>='} {lo:g}"
        if hi is not None:
            return f"{'<' if self.high_open else '<='} {hi:g}"
        return ""

    def default_text(self) -> str:
        if self.default is None:
            return ""
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        if isinstance(self.default, tuple):
            return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in self.default)
        if isinstance(self.default, float):
            return f"{self.default:g}"
        return str(self.default)

    # -- validation -------------------------------------------------------------------------
    def check(self, value: Any, where: str = "") -> Any:
        """``value`` converted to the option's type, or :class:`GradlabError` in one line naming
        the option, the bad value and what is allowed (``where``: e.g. ``"in config.yaml"``)."""
        if value is None:
            if self.accepts_none:
                return None
            self._fail(value, where)
        if self.kind is tuple:
            return self._check_tuple(value, where)
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            self._fail(value, where)
        if self.kind is str:
            if not isinstance(value, str):
                self._fail(value, where)
            if self.choices and value not in self.choices:
                close = difflib.get_close_matches(value, self.choices, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise GradlabError(f"invalid {self.what}: {value!r}{_where(where)} (must be one of: "
                                   f"{', '.join(self.choices)}){hint}")
            return value
        return self._check_number(value, self.kind, where)

    def _check_number(self, value: Any, kind: type, where: str):
        if isinstance(value, str):
            try:
                float(value)
                looks_numeric = True
            except ValueError:
                looks_numeric = False
            if looks_numeric:
                raise GradlabError(f"invalid {self.what}: {value!r}{_where(where)} is text, not a number "
                                   f"(write it without quotes; must be {self.describe_range()})")
            self._fail(value, where)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if hasattr(value, "item") and not isinstance(value, bool):  # numpy / torch scalars
                return self._check_number(value.item(), kind, where)
            self._fail(value, where)
        if isinstance(value, float) and math.isnan(value):
            self._fail(value, where)
        if self.finite and isinstance(value, float) and math.isinf(value):
            self._fail(value, where)
        given = value
        if kind is int:
            if isinstance(value, float):
                if not value.is_integer():
                    self._fail(value, where)
                value = int(value)
        else:
            value = float(value)
        lo, hi = self.low, self.high
        if lo is not None and (value <= lo if self.low_open else value < lo):
            self._fail(given, where)
        if hi is not None and (value >= hi if self.high_open else value > hi):
            self._fail(given, where)
        return value

    def _check_tuple(self, value: Any, where: str) -> tuple:
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",")]
            value = []
            for p in parts:
                try:
                    value.append(float(p))
                except ValueError:
                    self._fail(",".join(parts), where)
        if not isinstance(value, (list, tuple)) or len(value) != self.length:
            self._fail(value, where)
        return tuple(self._check_number(v, self.item, where) for v in value)

    def _fail(self, value: Any, where: str):
        raise GradlabError(f"invalid {self.what}: {value!r}{_where(where)} (must be {self.describe_range()})")


def _where(where: str) -> str:
    return f" {where}" if where else ""


class Options:
    """The ordered options of one plug-in or command; immutable.

    ``a + b`` joins two sets; a name declared in both must be declared the same way.
    """

    def __init__(self, *options: Option):
        self._by_name: dict[str, Option] = {}
        for opt in options:
            if opt.name in self._by_name and self._by_name[opt.name] != opt:
                raise TypeError(f"option {opt.name!r} declared twice, differently")
            self._by_name[opt.name] = opt

    def __iter__(self) -> Iterator[Option]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> Option:
        return self._by_name[name]

    def __add__(self, other: "Options") -> "Options":
        return Options(*self, *other)

    def __repr__(self) -> str:
        return f"Options({', '.join(self._by_name)})"

    def names(self) -> list[str]:
        return list(self._by_name)

    def defaults(self) -> dict:
        return {o.name: o.default for o in self}

    def without(self, *names: str) -> "Options":
        return Options(*(o for o in self if o.name not in names))

    def resolve(self, given: Mapping[str, Any], *, owner: str = "", where: Any = "",
                others: Optional[Mapping[str, "Options"]] = None) -> dict:
        """Every option's value: ``given`` over the defaults, each checked.

        Args:
            given: option values (``None`` for an option whose default is not None means "not
                given": the default stays).
            owner: who the options belong to, for messages (``"optimizer adam"``).
            where: where the values come from, for messages (``"in run.yaml"``), or a mapping
                of key -> where, when they come from several sources.
            others: the options of the other plug-ins of the same kind (name -> Options): a key
                that is theirs gets "is an option of X, not of <owner>".
        Raises:
            GradlabError: for an unknown key (with a "did you mean") or a bad value.
        """
        at = where.get if isinstance(where, Mapping) else (lambda _key, _d="": where)
        for key in given:
            if key not in self:
                check_keys([key], self.names(), owner=owner, where=at(key, ""), others=others)
        out = {}
        for opt in self:
            value = given.get(opt.name)
            if opt.name in given and (value is not None or opt.accepts_none):
                out[opt.name] = opt.check(value, at(opt.name, ""))
            else:
                out[opt.name] = opt.default
        return out


def check_keys(given: Iterable[str], valid: Sequence[str], *, owner: str = "", where: str = "",
               others: Optional[Mapping[str, Options]] = None, command: bool = False) -> None:
    """Raise one :class:`GradlabError` for the first key of ``given`` not in ``valid``
    (``command``: the keys of a whole command's configuration, not of one plug-in)."""
    valid_set = set(valid)
    for key in given:
        if key in valid_set:
            continue
        if not isinstance(key, str) or not key:
            raise GradlabError(f"invalid option name {key!r}{_where(where)}: expected key=value with a name")
        whose = sorted(name for name, opts in (others or {}).items() if key in opts)
        of = f" of {owner}" if owner else ""
        if whose:
            raise GradlabError(f"{key!r} is an option of {', '.join(whose)}, not{of} "
                               f"(its options: {', '.join(valid) or 'none'})" + (f"; {where}" if where else ""))
        close = difflib.get_close_matches(key, list(valid), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(sorted(valid))}"
        if command:  # a command's configuration: "unknown key in config file: epochz"
            raise GradlabError(f"unknown key{_where(where)}: {key}{hint}")
        raise GradlabError(f"unknown option {key!r}{of}{_where(where)}{hint}")


def parse_numbers(text: Any, what: str, finite: bool = True) -> list[float]:
    """``"0,0.01,0.03"`` -> ``[0.0, 0.01, 0.03]``: a comma list of numbers (an ``--eps`` sweep, a
    start point); one clear error naming ``what`` otherwise. ``nan`` is never a number here, and
    ``inf`` only with ``finite=False`` (as for :class:`Option`)."""
    try:
        vals = [float(t) for t in str(text).split(",") if t.strip() != ""]
    except ValueError:
        raise GradlabError(f"invalid {what} {text!r}: expected a number or a comma-separated list of numbers") from None
    if not vals:
        raise GradlabError(f"invalid {what} {text!r}: empty")
    for v in vals:
        if math.isnan(v) or (finite and math.isinf(v)):
            raise GradlabError(f"invalid {what} {text!r}: {v} is not a finite number")
    return vals


__all__ = ["Option", "Options", "check_keys", "parse_numbers"]
