"""Stopping a run cleanly on Ctrl-C (SIGINT) and SIGTERM.

SIGTERM is what a batch scheduler, ``timeout``, ``torchrun`` (when it stops its workers) and a
plain ``kill`` send: gradlab treats it as Ctrl-C. The first signal becomes a request that the
training loop honours at the next step boundary, so the checkpoint written there never holds a
half-applied update; a second signal interrupts at once (``KeyboardInterrupt``), keeping the
last checkpoint as it is. A process stopped by signal ``n`` exits with ``128 + n`` (130 for
SIGINT, 143 for SIGTERM), as a shell reports a process killed by it.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

from gradlab.runs.signals import SIGNALS, signal_name  # the signals every command stops on


class DeferredInterrupt:
    """While active (a ``with`` block on the main thread), SIGINT and SIGTERM only set
    :attr:`requested` and record the first one in :attr:`signum`; a second one raises
    ``KeyboardInterrupt``. Re-entrant: nested blocks keep the outermost one's handlers, which
    its exit restores (the CLI holds one around fit() and the writing of the summary, so a
    SIGTERM that arrives meanwhile cannot cut the run folder's last records short).

    Attributes:
        requested: a stop was asked for (by a signal or by :meth:`request`).
        signum: the first signal received, or None.
        escalate: whether a second signal raises ``KeyboardInterrupt``; set False once training
            has stopped, so that no signal cuts the writing of the last records short.
    """

    def __init__(self):
        self.requested = False
        self.signum: Optional[int] = None
        self._old: dict = {}
        self._depth = 0
        self.escalate = True

    def request(self, signum: Optional[int] = None) -> None:
        self.requested = True
        if self.signum is None:
            self.signum = signum

    def _handler(self, signum, frame):
        if self.requested and self.signum is not None and self.escalate:
            raise KeyboardInterrupt
        self.request(signum)

    def __enter__(self):
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handler) for s in SIGNALS}
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            for s, old in self._old.items():
                signal.signal(s, old)
            self._old = {}
        return False


__all__ = ["DeferredInterrupt", "SIGNALS", "signal_name"]
