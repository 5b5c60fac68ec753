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
import threading
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
    """Context manager: while open, SIGINT, SIGTERM and SIGHUP are forwarded to every child
    :meth:`run` is waiting for (``gradlab run --jobs N`` runs several at once, each
    :meth:`run` on a thread of its own); :attr:`received` holds the first one (``None``: none
    came)."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._running: set = set()  # the children started and not yet waited for
        self._told: set = set()  # pids of the children a signal was forwarded to
        self._lock = threading.Lock()
        self._previous: dict = {}

    def __enter__(self) -> "Children":
        for signum in EXIT_CODES:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc) -> bool:
        try:
            self._stop_children()
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
        # no lock here: this runs in the signal handler, on the main thread, which may hold it
        for child in list(self._running):
            if child.pid in self._told or child.poll() is not None:
                continue
            try:
                os.killpg(child.pid, _FORWARD_AS.get(signum, signum))
            except ProcessLookupError:  # it has just ended
                continue
            self._told.add(child.pid)

    def run(self, argv: list, env: Optional[dict] = None) -> tuple[int, str, str]:
        """Run ``argv`` (with environment ``env``, default this one's) to its end; ``(exit code,
        stdout, stderr)``. A child ended by a signal it did not handle reports 128 + the
        signal's number, as a shell does. Safe to call from several threads at once."""
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                **_OWN_GROUP)
        with self._lock:
            self._running.add(proc)
        if self.received is not None:  # came while it was starting
            self._forward(self.received)
        try:
            out, err = proc.communicate()  # a signal handled meanwhile only forwards; this goes on
        finally:
            with self._lock:
                self._running.discard(proc)
        code = proc.returncode
        return (128 - code if code < 0 else code), out, err

    def _stop_children(self) -> None:
        """Stop the children left running by an error in the experiment itself: SIGTERM, time
        for their own clean stop, then SIGKILL; always waited for."""
        with self._lock:
            procs, self._running = list(self._running), set()
        procs = [p for p in procs if p.poll() is None]
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs:
            try:
                proc.wait(_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()


__all__ = ["EXIT_CODES", "Children"]
