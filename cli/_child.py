"""The runs of ``gradlab run`` as child processes, and the signals that must reach them.

Each combination of an experiment runs as ``python -m gradlab COMMAND ...`` in a process of its
own, so a crash or a divergence cannot take the sweep down. The child starts in a process group
of its own: a Ctrl-C at the terminal then reaches it once, forwarded by :class:`Children`, not
twice (a second SIGINT tells a train run to stop at once rather than at its next step). SIGINT
and SIGTERM sent to ``gradlab run`` (and a hang-up, as SIGTERM) go to the running child's
process group (its own children, e.g. torchrun's ranks, included); the child finishes its own
clean stop (a train run writes its checkpoint and exits 130 or 143), the experiment starts no
further run, and its caller removes the temporary files and exits with 128 + the signal. A child still running when the experiment leaves
for any other reason is stopped and waited for: none is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Optional

#: The exit code of a process stopped by each signal it handles (128 + the signal's number).
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
# What the child is sent for each: a closed terminal's hang-up asks it to stop as SIGTERM does
# (its own process group is not the terminal's job, so the hang-up would not reach it).
_FORWARD_AS = {signal.SIGHUP: signal.SIGTERM}
# A process group of its own (Python 3.10 has no process_group argument).
_OWN_GROUP = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
# How long a child gets for its own clean stop when the experiment leaves on an error.
_GRACE_SECONDS = 60


class Children:
    """Context manager: while open, SIGINT, SIGTERM and SIGHUP are forwarded to the child
    :meth:`run` is waiting for; :attr:`received` holds the first one (``None``: none came)."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._child: Optional[subprocess.Popen] = None
        self._told: Optional[int] = None  # pid of the child a signal was forwarded to
        self._previous: dict = {}

    def __enter__(self) -> "Children":
        for signum in EXIT_CODES:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc) -> bool:
        try:
            self._stop_child()
        finally:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
        return False

    @property
    def exit_code(self) -> Optional[int]:
        return None if self.received is None else EXIT_CODES[self.received]

    def _on_signal(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
        self._forward(signum)

    def _forward(self, signum: int) -> None:
        child = self._child
        if child is not None and child.poll() is None:
            try:
                os.killpg(child.pid, _FORWARD_AS.get(signum, signum))
            except ProcessLookupError:  # it has just ended
                return
            self._told = child.pid

    def run(self, argv: list) -> tuple[int, str, str]:
        """Run ``argv`` to its end; ``(exit code, stdout, stderr)``. A child ended by a signal
        it did not handle reports 128 + the signal's number, as a shell does."""
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **_OWN_GROUP)
        self._child = proc
        if self.received is not None and self._told != proc.pid:  # came while it was starting
            self._forward(self.received)
        out, err = proc.communicate()  # a signal handled meanwhile only forwards; this goes on
        self._child = None
        code = proc.returncode
        return (128 - code if code < 0 else code), out, err

    def _stop_child(self) -> None:
        """Stop a child left running by an error in the experiment itself: SIGTERM, time for its
        own clean stop, then SIGKILL; always waited for."""
        proc, self._child = self._child, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(_GRACE_SECONDS)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


__all__ = ["EXIT_CODES", "Children"]
