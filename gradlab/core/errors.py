"""The one error type for user mistakes.

The core raises :class:`GradlabError` with a message that names the bad value and, where there
is a fixed set, the valid choices. The CLI turns it into one line on stderr and exit code 2
(:mod:`gradlab_cli.main`). Anything else escaping the core is a bug and keeps its traceback.
"""


class GradlabError(Exception):
    """A mistake the user can fix: bad name, out-of-range number, missing file, ..."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`GradlabError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise GradlabError(message)


def check_positive(name: str, value, *, strict: bool = True) -> None:
    """Validate a number the torch.optim way: ``Invalid lr: -1 (must be > 0)``."""
    ok = value > 0 if strict else value >= 0
    if not ok:
        raise GradlabError(f"invalid {name}: {value} (must be {'>' if strict else '>='} 0)")
