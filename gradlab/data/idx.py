"""MNIST (LeCun et al. 1998) and Fashion-MNIST (Xiao et al. 2017) from the original IDX files.

Files (gzip, or uncompressed with the same name minus ``.gz``): ``train-images-idx3-ubyte.gz``,
``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``.
IDX layout: a big-endian header ``0x00 0x00 <dtype=0x08 ubyte> <ndim>``, then ``ndim`` uint32
sizes, then the uint8 payload; images have ``ndim`` 3 (magic 2051), labels ``ndim`` 1 (2049).
Every file is checked (magic, sizes, payload length, label range) and a bad one is named.

With all four files the official 60k/10k split is used. When a folder holds only the test-set
files (images and labels of ``t10k``), the 10,000 test images are split train/test by seed
(stratified, ``test_fraction``) and ``bundle.notes`` says so. Inputs: ``(N, 1, 28, 28)`` in [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gradlab.data.common import make_bundle, stratified_split
from gradlab.data.files import candidate_dirs, data_root, download_any, find_file, missing_files_error, read_bytes
from gradlab.core.options import Options
from gradlab.data.options import DOWNLOAD, MAX_TRAIN, TEST_FRACTION
from gradlab.data.registry import DATASETS
from gradlab.core.errors import GradlabError

TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
ALL_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

SUBDIRS = {
    "mnist": ("mnist", "MNIST/raw"),
    "fashion-mnist": ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw"),
}
MIRRORS = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://yann.lecun.com/exdb/mnist/"),
    "fashion-mnist": ("https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}
_MAGIC = {3: 2051, 1: 2049}


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file of uint8 with ``ndim`` dims (3: images, 1: labels); GradlabError if malformed."""
    raw = read_bytes(path)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise GradlabError(f"corrupt IDX file {path}: only {len(raw)} bytes")
    magic = int.from_bytes(raw[:4], "big")
    if magic != _MAGIC[ndim]:
        raise GradlabError(f"corrupt IDX file {path}: magic number {magic}, expected {_MAGIC[ndim]}")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise GradlabError(
            f"corrupt IDX file {path}: {len(raw) - header} bytes of data, expected {expected} for shape {tuple(dims)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_pair(folder: Path, images: str, labels: str) -> tuple[np.ndarray, np.ndarray]:
    ipath, lpath = find_file(folder, images), find_file(folder, labels)
    x, y = read_idx(ipath, 3), read_idx(lpath, 1)
    if len(x) != len(y):
        raise GradlabError(f"{ipath} holds {len(x)} images but {lpath} holds {len(y)} labels")
    if x.shape[1:] != (28, 28):
        raise GradlabError(f"corrupt IDX file {ipath}: images of shape {x.shape[1:]}, expected (28, 28)")
    if y.size and y.max() > 9:
        raise GradlabError(f"corrupt IDX file {lpath}: label {int(y.max())} outside 0..9")
    return x, y


def _locate(dirs: list[Path]) -> tuple[Path | None, bool]:
    """The first folder with all four files (full=True), else the first with the test pair."""
    for d in dirs:
        if all(find_file(d, f) for f in ALL_FILES):
            return d, True
    for d in dirs:
        if find_file(d, TEST_IMAGES) and find_file(d, TEST_LABELS):
            return d, False
    return None, False


def load_idx_dataset(name: str, seed: int, data_dir, opts: dict):
    root = data_root(data_dir)
    dirs = candidate_dirs(root, SUBDIRS[name])
    folder, full = _locate(dirs)
    download_error = None
    if folder is None:
        if not opts["download"]:
            download_error = "downloads disabled (download=false)"
        else:
            dest = root / SUBDIRS[name][0]
            for f in ALL_FILES:
                download_error = download_error or download_any(MIRRORS[name], f, dest)
            if download_error is None:
                folder, full = _locate([dest])
        if folder is None:
            raise missing_files_error(name, ALL_FILES, dirs, download_error)
    x_test, y_test = _read_pair(folder, TEST_IMAGES, TEST_LABELS)
    notes = []
    if full:
        x_train, y_train = _read_pair(folder, TRAIN_IMAGES, TRAIN_LABELS)
    else:
        tr, te = stratified_split(y_test, opts["test_fraction"], seed)
        x_train, y_train, x_test, y_test = x_test[tr], y_test[tr], x_test[te], y_test[te]
        notes.append(
            f"{folder} holds only the {name} test-set files (no {TRAIN_IMAGES}): split its "
            f"{len(tr) + len(te)} test images into {len(tr)} train / {len(te)} test by seed {seed}"
        )
    scale = np.float32(1 / 255)
    return make_bundle(
        name, x_train[:, None] * scale, y_train, x_test[:, None] * scale, y_test, 10, notes
    )


def _loader(name: str):
    def load(seed, data_dir, opts):
        return load_idx_dataset(name, seed, data_dir, opts)

    return load


# test_fraction splits a folder that holds only the t10k files (see load_idx_dataset).
_OPTIONS = Options(TEST_FRACTION, DOWNLOAD, MAX_TRAIN)
DATASETS.add("mnist", _loader("mnist"), "MNIST handwritten digits, 28x28 (IDX files from --data-dir or GRADLAB_DATA)",
             options=_OPTIONS, paper="LeCun et al. 1998")
DATASETS.add(
    "fashion-mnist",
    _loader("fashion-mnist"),
    "Fashion-MNIST clothing images, 28x28 (IDX files from --data-dir or GRADLAB_DATA)",
    options=_OPTIONS,
    paper="Xiao et al. 2017",
)
