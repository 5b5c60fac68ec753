"""Where dataset files live, and fetching them when they are absent.

Search root: ``data_dir`` if given, else the ``GRADLAB_DATA`` environment variable, else
``~/.cache/gradlab`` (``$XDG_CACHE_HOME/gradlab``). Within the root a loader looks in its own
subfolder names first (``mnist/``, ``fashion-mnist/``, torchvision's ``MNIST/raw``, ...) and then
in the root itself, so pointing ``--data-dir`` straight at the folder of files works too.
Downloads go to ``<root>/<first subfolder name>/``; :func:`fetch` is the one network call
(tests replace it).
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import urllib.request
import zlib
from pathlib import Path

from gradlab.core.errors import GradlabError

TIMEOUT_S = 10.0  # per socket operation: fail fast when offline


def data_root(data_dir) -> Path:
    if data_dir:
        return Path(data_dir).expanduser()
    env = os.environ.get("GRADLAB_DATA")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "gradlab"


def candidate_dirs(root: Path, subdirs) -> list[Path]:
    """``root/sub`` for each name, then ``root`` itself (order = preference)."""
    return [root / s for s in subdirs] + [root]


def find_file(folder: Path, name: str) -> Path | None:
    """``name`` (a ``.gz`` name) in ``folder``, or its uncompressed twin; None if neither exists."""
    for candidate in (folder / name, folder / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped if it ends in ``.gz``; GradlabError naming a corrupt file."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise GradlabError(f"corrupt or unreadable data file {path}: {exc}") from None


def fetch(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` atomically (temporary file, then rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
            shutil.copyfileobj(resp, out)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def download_any(mirrors, filename: str, dest_dir: Path) -> str | None:
    """Try each mirror for ``filename``; None on success, else the last error as text."""
    error = "no mirror"
    for base in mirrors:
        try:
            fetch(base + filename, dest_dir / filename)
            return None
        except Exception as exc:  # network errors come in many types (URLError, timeout, HTTP 403...)
            error = f"{base + filename}: {exc}"
    return error


def missing_files_error(dataset: str, files, searched, download_error: str | None, hint: str = "") -> GradlabError:
    where = ", ".join(str(p) for p in searched)
    msg = f"{dataset} files not found: expected {', '.join(files)} in {where}"
    if download_error:
        msg += f"; download failed ({download_error})"
    msg += f". Put the files there or pass --data-dir / set GRADLAB_DATA{hint}"
    return GradlabError(msg)
