"""Checkpoints: plain ``torch.save`` files, written atomically, optionally in the background.

A checkpoint is a deep clone of the state taken on the caller's thread (every tensor
``.detach().clone()``, contiguous and with its own storage; dicts and lists copied), so the
training loop may change its tensors in place as soon as :meth:`CheckpointWriter.submit`
returns, and so that no saved tensor is a view into a buffer it shares with another (a view
is saved with its whole storage and loads with an offset into it). The file is written to a
hidden temporary file in the same folder and renamed over the old one: a kill at any moment
leaves either the previous checkpoint or the new one, never half of one; the temporary file a
kill leaves behind is removed when the run starts again (:func:`remove_stale_temporaries`).

Loading uses ``weights_only=True``: tensors and plain containers, never code.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Sequence

from gradlab.core.errors import GradlabError
from gradlab.runs.write_errors import with_filename


def clone_state(obj: Any) -> Any:
    """A deep copy of ``obj`` in which every tensor is a detached, contiguous clone with its own
    storage. Dicts keep their type and attributes (a module ``state_dict``'s version metadata);
    lists and tuples are rebuilt; immutable leaves (numbers, strings, dtypes) are shared."""
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.layout == torch.strided:
            return t.clone(memory_format=torch.contiguous_format)
        return t.clone()
    if isinstance(obj, dict):
        out = copy.copy(obj)  # same class, same instance attributes (OrderedDict._metadata)
        for k, v in obj.items():
            out[k] = clone_state(v)
        return out
    if type(obj) is list:
        return [clone_state(v) for v in obj]
    if type(obj) is tuple:
        return tuple(clone_state(v) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)):
        return obj
    return copy.deepcopy(obj)


def save_checkpoint(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically (a temporary file in the same folder, fsynced,
    then renamed); the temporary file is removed if anything fails. ``obj`` is written as it
    is: clone it first (:func:`clone_state`) if another thread may change it meanwhile."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def atomic_write(path: str | Path, write, *, binary: bool) -> None:
    """``write(file)`` into a temporary file beside ``path``, fsynced, then renamed over
    ``path``: a kill leaves the old file or the new one, never half of one; the temporary file
    is removed if anything fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            write(f)  # open() above names a missing folder as FileNotFoundError
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        named = with_filename(e, path, tmp)  # a full disk fails in write() or fsync(), which name no file
        if named is e:
            raise
        raise named from None


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files (``.NAME.tmp``) that :func:`atomic_write` leaves in ``folder``
    when the process is killed mid-write; they are never read. Returns those removed."""
    gone = []
    for p in Path(folder).glob(".*.tmp"):
        if p.is_file():
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def load_checkpoint(path: str | Path, map_location="cpu", keys: Sequence[str] = ()) -> dict:
    """Load a checkpoint with ``weights_only=True``: a dict holding at least ``keys``.

    Raises:
        GradlabError: no file at ``path``.
        RunFolderError: the file is empty, truncated or foreign (not a torch file, or holding
            more than tensors and plain values), is not a dict, or lacks one of ``keys``; one
            line that names the file and what is wrong.
    """
    import torch

    from gradlab.runs.records import RunFolderError

    path = Path(path)
    if not path.is_file():
        raise GradlabError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise RunFolderError(path, "the file is empty (0 bytes)", prefix="cannot read checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, foreign or holding more than tensors and plain values
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunFolderError(path, first, prefix="cannot read checkpoint") from None
    if not isinstance(ckpt, dict):
        raise RunFolderError(path, f"holds a {type(ckpt).__name__}, not a dict of states",
                             prefix="cannot read checkpoint")
    missing = [k for k in keys if k not in ckpt]
    if missing:
        held = ", ".join(map(str, ckpt)) or "nothing"
        raise RunFolderError(path, f"missing key {missing[0]!r} (it holds: {held})", prefix="cannot read checkpoint")
    return ckpt


class CheckpointWriter:
    """Writes checkpoints on one background thread, one at a time, in order.

    :meth:`submit` clones the state on the calling thread and returns; the pickling, writing
    and renaming happen on the thread. At most one write is in flight: a second submit first
    waits for the one before, so memory stays bounded and a failed write surfaces at the next
    submit, :meth:`wait` or :meth:`close`.
    """

    def __init__(self):
        self._pool = None
        self._pending = None

    def submit(self, obj: Any, path: str | Path) -> None:
        self.wait()
        state = clone_state(obj)
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="gradlab-checkpoint")
        self._pending = self._pool.submit(save_checkpoint, state, Path(path))

    def wait(self) -> None:
        """Block until the last submitted checkpoint is in place; re-raise its error, if any."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
