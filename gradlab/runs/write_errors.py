"""When a run folder cannot be written: a probe before any work starts, and one line naming the
cause of a write that failed (disk full, read-only, permissions) instead of a traceback.

A full disk surfaces anywhere a run writes (a checkpoint on its background thread, a metrics
row, a TensorBoard event, the summary), often as an error that does not say so (torch's
``inline_container.cc`` error wraps the ``OSError`` of the file it writes into);
:func:`write_error_message` finds the ``OSError`` in the exception's chain and names the file.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Optional

from gradlab.core.errors import GradlabError

_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


def os_error_in(exc: BaseException) -> Optional[OSError]:
    """The first ``OSError`` among ``exc``, its cause and its context (a few levels deep)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def write_error_message(exc: BaseException, folder: Optional[Path] = None) -> Optional[str]:
    """One line for a failed write into run folder ``folder``, or None when ``exc`` holds no
    ``OSError``. ``"no space left on device writing <file>"``, ``"runs folder <folder> is not
    writable (<reason>) writing <file>"``, else ``"cannot write <file>: <reason>"``."""
    e = os_error_in(exc)
    if e is None:
        return None
    where = e.filename or folder or "the run folder"
    if e.errno in _FULL:
        return f"no space left on device writing {where}"
    reason = (e.strerror or os.strerror(e.errno)).lower()
    if e.errno in _READ_ONLY:
        return f"runs folder {folder or Path(str(where)).parent} is not writable ({reason}) writing {where}"
    return f"cannot write {where}: {reason}"


def with_filename(exc: BaseException, path: Path, temporary: Optional[Path] = None) -> BaseException:
    """``exc`` itself if it names a file other than ``temporary`` or holds no ``OSError``; else
    an ``OSError`` of the same kind that names ``path`` (a failed ``write`` or ``fsync`` names no
    file, and the temporary file of an atomic write is not the one a user knows)."""
    e = os_error_in(exc)
    if e is None or (e is exc and e.filename and str(e.filename) != str(temporary)):
        return exc
    new = OSError(e.errno, e.strerror or os.strerror(e.errno), str(path))
    new.__cause__ = exc
    return new


def check_writable(folder: str | Path, what: str = "runs folder") -> None:
    """Create and remove a file in ``folder`` (or, if it does not exist yet, in its nearest
    existing parent, so that a probe creates no folder): a read-only disk or a folder without
    write permission is named before any data loads or any training starts.

    Raises:
        GradlabError: ``"<what> <folder> is not writable (<reason>)"``.
    """
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise GradlabError(f"{what} {folder} is not writable: {existing} is not a folder")
    probe = existing / f".gradlab-write-probe-{os.getpid()}-{id(folder):x}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = (e.strerror or os.strerror(e.errno or 0)).lower()
        raise GradlabError(f"{what} {folder} is not writable ({reason})") from None


__all__ = ["check_writable", "os_error_in", "with_filename", "write_error_message"]
