"""Shared fixtures (keep tiny and additive; owned by the models/datasets helper)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

# The test machine has 2 cores shared by many processes: torch's default intra-op thread pool
# oversubscribes them and makes small-model tests an order of magnitude slower.
torch.set_num_threads(1)
# The same for the processes the tests start (gradlab run's children, console-script runs): they
# inherit this environment; a value set outside the suite wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The plug-in manifest (gradlab.core.manifest) of this test session lives in a folder of its own,
# never in the user's cache.
if "GRADLAB_CACHE" not in os.environ:
    os.environ["GRADLAB_CACHE"] = tempfile.mkdtemp(prefix="gradlab-test-cache-")
# So does the record of trusted user-model runs (gradlab.runs.trust); tests may point it elsewhere.
os.environ["GRADLAB_STATE_DIR"] = tempfile.mkdtemp(prefix="gradlab-test-state-")

MNIST_DIR = Path("/work/shared/data/mnist")


@pytest.fixture
def digits_spec():
    """DataSpec of the default dataset (1x8x8 images, 10 classes), without loading it."""
    from gradlab.data.base import DataSpec

    return DataSpec("digits", (1, 8, 8), 10, [0.3], [0.37])


@pytest.fixture(scope="session")
def digits():
    """The default dataset (digits, seed 0), loaded once per session."""
    from gradlab.data import load_dataset

    return load_dataset("digits", seed=0)


@pytest.fixture
def mnist_dir():
    """The real MNIST test-set folder (10k test images + labels, train labels only)."""
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST files not found in {MNIST_DIR}")
    return MNIST_DIR


@pytest.fixture
def no_network(monkeypatch):
    """Make every dataset download fail at once (tests never touch the network); returns the URLs tried."""
    from gradlab.data import files

    tried: list[str] = []

    def refuse(url, dest):
        tried.append(url)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(files, "fetch", refuse)
    monkeypatch.delenv("GRADLAB_DATA", raising=False)
    return tried


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped where no CUDA GPU is visible (CI never needs one)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A runs folder holding one digits MLP run (``tiny``, 1 epoch, the train defaults), made once
    per test module that asks for it; the module's attack runs go into the same folder."""
    from gradlab_cli.main import main

    runs = tmp_path_factory.mktemp("runs")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--epochs", "1", "--runs-dir", str(runs), "--quiet", "--name", "tiny"])
    assert exc.value.code == 0
    return runs
