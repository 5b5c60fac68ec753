"""Which run folders may import the user model their ``config.yaml`` names.

A run's ``config.yaml`` can name a user model ``package.module:factory``; rebuilding that run
(``--resume``, ``attack --run``, ``probe NAME --run``, ``simplex``, ``connect``) imports the module,
that is, runs its code. A run folder is data that anyone can write, copy or send, so a field in
it cannot vouch for itself. The record is kept outside every run folder instead, in this user's
state folder (``$GRADLAB_STATE_DIR``, else ``$XDG_STATE_HOME/gradlab``, else
``~/.local/state/gradlab``): ``trusted-runs.txt`` holds one line ``<sha256 of config.yaml>
<model>`` per run that this user created with a user model (creating it already ran that code at
their request). Any other run folder that names a user model needs an explicit ``--trust-code``
(``trust_code=True`` in the Python API); a copied run keeps its trust, an edited config.yaml
loses it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from gradlab.core.options import Option

TRUST_FILE = "trusted-runs.txt"
TRUST_HELP = ("import the user model (package.module:factory) that a run folder's config.yaml names even "
              "if you did not create that run with it; importing runs the module's code, so use it only "
              "for run folders you trust")
#: ``--trust-code``: the one option of every command that rebuilds a model from a run folder.
TRUST_CODE = Option("trust_code", bool, False, TRUST_HELP)


def state_dir() -> Path:
    """This user's gradlab state folder (see the module docstring)."""
    if os.environ.get("GRADLAB_STATE_DIR"):
        return Path(os.environ["GRADLAB_STATE_DIR"])
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "gradlab"


def names_code(model) -> bool:
    """True if ``model`` names a user model ``package.module:factory`` (code to import)."""
    return isinstance(model, str) and ":" in model


def _digest(run_path: Path) -> str:
    return hashlib.sha256((Path(run_path) / "config.yaml").read_bytes()).hexdigest()


def record_trusted(run_path: str | Path, model: str) -> bool:
    """Note that this user created the run at ``run_path`` with user model ``model``; False if
    the state folder cannot be written (the run then needs ``--trust-code`` to be rebuilt)."""
    line = f"{_digest(Path(run_path))} {model}\n"
    try:
        d = state_dir()
        d.mkdir(parents=True, exist_ok=True)
        with open(d / TRUST_FILE, "a") as f:  # one short append: whole lines even from parallel runs
            f.write(line)
    except OSError:
        return False
    return True


def is_trusted(run_path: str | Path, model: str) -> bool:
    """True if this user created the run at ``run_path`` (its config.yaml unchanged since) with
    user model ``model``."""
    try:
        want = f"{_digest(Path(run_path))} {model}"
        with open(state_dir() / TRUST_FILE) as f:
            return any(line.rstrip("\n") == want for line in f)
    except OSError:
        return False


__all__ = ["TRUST_CODE", "TRUST_HELP", "is_trusted", "names_code", "record_trusted", "state_dir"]
