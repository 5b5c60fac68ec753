"""SIGTERM is Ctrl-C for every command: a run folder that a signal stops is marked ``interrupted``.

SIGTERM is what a batch scheduler (Slurm, before it kills), ``timeout``, ``kill`` and torchrun's
agent (to the survivors of a dead rank) send; by default it ends Python at once, leaving a run
folder without ``summary.csv`` and nothing on stderr. While :class:`StopOnSignals` is active (the
CLI holds it around every command), SIGINT and SIGTERM raise :class:`Interrupted`, a
``KeyboardInterrupt`` that remembers its signal: ``with RunDir(...)`` marks its folder
``interrupted`` (keeping what was written so far) and names itself on the exception, so the caller
can say in one line which signal stopped which run. Nothing here prints.

``gradlab train`` defers the signal to a step boundary instead
(:class:`gradlab.training.interrupts.DeferredInterrupt`, which takes the handlers over while it is
active and gives them back).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)

__all__ = ["Interrupted", "SIGNALS", "StopOnSignals", "signal_name"]


def signal_name(signum: Optional[int]) -> str:
    """``"SIGTERM"`` for 15; ``"Ctrl-C"`` for SIGINT."""
    if signum == signal.SIGINT:
        return "Ctrl-C"
    try:
        return signal.Signals(signum).name
    except (TypeError, ValueError):
        return f"signal {signum}"


class Interrupted(KeyboardInterrupt):
    """A stop by signal ``signum``; ``runs``: the run folders it marked ``interrupted``."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal_name(signum)}")
        self.signum = signum
        self.runs: list[Path] = []


class StopOnSignals:
    """While active (a ``with`` block; only on the main thread, elsewhere a no-op), SIGINT and
    SIGTERM raise :class:`Interrupted` where the main thread is; the first one raised is kept in
    :attr:`raised` (the caller reads it after a framework turned the exception into an exit code;
    its ``runs`` lists the folders marked by any of them).
    The previous handlers come back at the end."""

    def __init__(self):
        self.raised: Optional[Interrupted] = None
        self._runs: list[Path] = []  # shared by every exception raised here (a second signal's too)
        self._old: dict = {}

    def _handler(self, signum, frame):
        exc = Interrupted(signum)
        exc.runs = self._runs
        if self.raised is None:
            self.raised = exc
        raise exc

    def __enter__(self) -> "StopOnSignals":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handler) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> bool:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}
        return False
