"""CIFAR-10 (Krizhevsky 2009) from the python-pickle batches.

Folder ``cifar-10-batches-py`` holding ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``
(each a pickled dict: ``b"data"`` uint8 ``(10000, 3072)`` in channel-major order, ``b"labels"``).
Searched in ``<root>/cifar-10-batches-py``, ``<root>/cifar10/cifar-10-batches-py``,
``<root>/cifar10`` and ``<root>``; when absent the official tarball is downloaded and unpacked
into ``<root>/cifar10/``. Inputs: ``(N, 3, 32, 32)`` in [0, 1]; official 50k/10k split.

Safety: pickle can run arbitrary code, so the batches are read with an unpickler that resolves
only the few globals a numpy array needs (``numpy.ndarray``, ``numpy.dtype``, numpy's array
reconstructors, ``_codecs.encode``) and refuses anything else; ``encoding="bytes"`` reads the
Python-2 pickles. Only files in the folder the user pointed to (or that gradlab downloaded) are
opened.

``stream=true`` (:mod:`gradlab.data.stream`): one pass over the training files at load counts
their examples and accumulates the statistics (one file decoded at a time); afterwards each
process (the main one or a ``DataLoader`` worker) keeps at most :data:`CACHE_FILES` decoded
files, and training shuffles files and examples within them (``blocks``).
"""

from __future__ import annotations

import bisect
import importlib
import io
import pickle
import tarfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from gradlab.data.common import make_bundle
from gradlab.data.files import data_root, download_any, missing_files_error, read_bytes
from gradlab.core.options import Options
from gradlab.data.options import DOWNLOAD, MAX_TRAIN, STREAM, WORKERS
from gradlab.data.registry import DATASETS
from gradlab.core.errors import GradlabError

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
ALL_FILES = TRAIN_BATCHES + (TEST_BATCH,)
MIRRORS = ("https://www.cs.toronto.edu/~kriz/",)
TARBALL = "cifar-10-python.tar.gz"
SCALE = np.float32(1 / 255)
#: Decoded batch files each process keeps when streaming (a file is 10,000 images, 30 MB).
CACHE_FILES = 2

_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Resolves only the globals needed to rebuild numpy arrays; anything else is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module.startswith("numpy.core"):  # numpy 2 moved numpy.core -> numpy._core
            try:
                return getattr(importlib.import_module("numpy._core" + module[len("numpy.core") :]), name)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch -> ``(x uint8 (n, 3, 32, 32), y int64 (n,))``; GradlabError naming a bad file."""
    raw = read_bytes(path)
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # truncated, not a pickle, or a refused global
        raise GradlabError(f"corrupt CIFAR-10 batch {path}: {exc}") from None
    if not isinstance(batch, dict):
        raise GradlabError(f"corrupt CIFAR-10 batch {path}: not a dict")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise GradlabError(f"corrupt CIFAR-10 batch {path}: 'data' must be uint8 of shape (n, 3072)")
    y = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if y.shape != (len(data),) or (y.size and (y.min() < 0 or y.max() > 9)):
        raise GradlabError(f"corrupt CIFAR-10 batch {path}: 'labels' must be {len(data)} values in 0..9")
    return data.reshape(-1, 3, 32, 32), y


def _candidates(root: Path) -> list[Path]:
    return [root / "cifar-10-batches-py", root / "cifar10" / "cifar-10-batches-py", root / "cifar10", root]


def _locate(dirs) -> Path | None:
    for d in dirs:
        if all((d / f).is_file() for f in ALL_FILES):
            return d
    return None


def _download(root: Path) -> str | None:
    dest = root / "cifar10"
    error = download_any(MIRRORS, TARBALL, dest)
    if error is not None:
        return error
    try:
        with tarfile.open(dest / TARBALL, "r:gz") as tar:
            tar.extractall(dest, filter="data")  # "data" filter: no absolute paths, links or devices
    except (tarfile.TarError, OSError, EOFError) as exc:
        return f"cannot unpack {dest / TARBALL}: {exc}"
    return None


def load_cifar10(seed, data_dir, opts):
    root = data_root(data_dir)
    dirs = _candidates(root)
    folder, error = _locate(dirs), None
    if folder is None:
        error = _download(root) if opts["download"] else "downloads disabled (download=false)"
        folder = _locate(dirs) if error is None else None
        if folder is None:
            raise missing_files_error("cifar10", ALL_FILES, dirs, error, hint=" (the cifar-10-batches-py folder)")
    if opts.get("stream"):
        return _streamed(folder, opts.get("workers", 0))
    xs, ys = zip(*(read_batch(folder / f) for f in TRAIN_BATCHES))
    x_test, y_test = read_batch(folder / TEST_BATCH)
    return make_bundle("cifar10", np.concatenate(xs) * SCALE, np.concatenate(ys), x_test * SCALE, y_test, 10)


class CifarFiles(torch.utils.data.Dataset):
    """The examples of some batch files in order, decoded a file at a time (module docstring)."""

    def __init__(self, paths: list, sizes: list):
        self.paths, self.sizes = list(paths), [int(s) for s in sizes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).tolist()
        self._cache: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getstate__(self):  # a worker starts with an empty cache
        return {**self.__dict__, "_cache": OrderedDict()}

    def _file(self, f: int):
        if f in self._cache:
            self._cache.move_to_end(f)
            return self._cache[f]
        x, y = read_batch(self.paths[f])
        if len(y) != self.sizes[f]:
            raise GradlabError(f"CIFAR-10 batch {self.paths[f]} changed while streaming: {len(y)} examples, "
                               f"{self.sizes[f]} when loaded")
        self._cache[f] = (x, y)
        while len(self._cache) > CACHE_FILES:
            self._cache.popitem(last=False)
        return x, y

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        f = bisect.bisect_right(self.offsets, i) - 1
        x, y = self._file(f)
        j = i - self.offsets[f]
        return torch.from_numpy(x[j].astype(np.float32) * SCALE), int(y[j])


def _scan(paths) -> tuple[list, list, list]:
    """Each file's size, and the per-channel mean and std of all their examples (float64 sums of
    the float32 inputs, as the in-memory statistics), decoding one file at a time."""
    sizes, s1, s2, count = [], np.zeros(3), np.zeros(3), 0
    for path in paths:
        x, _ = read_batch(path)
        sizes.append(len(x))
        for i in range(0, len(x), 1000):
            chunk = (x[i : i + 1000] * SCALE).astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1)
            s1 += chunk.sum(1)
            s2 += (chunk * chunk).sum(1)
            count += chunk.shape[1]
    mean = s1 / max(count, 1)
    std = np.sqrt(np.maximum((s2 - count * mean * mean) / max(count - 1, 1), 0))
    return sizes, mean.tolist(), [float(s) if s > 0 else 1.0 for s in std]


def _streamed(folder: Path, workers: int):
    from gradlab.data.stream import StreamingData

    train_paths = [folder / f for f in TRAIN_BATCHES]
    sizes, mean, std = _scan(train_paths)
    test_size = len(read_batch(folder / TEST_BATCH)[1])
    return StreamingData("cifar10", CifarFiles(train_paths, sizes), CifarFiles([folder / TEST_BATCH], [test_size]),
                         (3, 32, 32), 10, mean, std, workers=workers, blocks=sizes)


DATASETS.add(
    "cifar10",
    load_cifar10,
    "CIFAR-10 colour images, 3x32x32 (python batches from --data-dir or GRADLAB_DATA)",
    options=Options(DOWNLOAD, MAX_TRAIN, STREAM, WORKERS),
    paper="Krizhevsky 2009",
)
