"""Datasets: shapes, [0, 1] range, seeded splits, statistics, file formats and their errors."""

from __future__ import annotations

import gzip
import pickle
import shutil

import numpy as np
import pytest
import torch

from gradlab.data import DATASET_OPTIONS, DATASETS, dataset_options_in, load_dataset
from gradlab.data.common import channel_stats
from gradlab.data.idx import ALL_FILES, read_idx
from gradlab.data.mnist1d import templates
from gradlab.core.errors import GradlabError


def _check_bundle(b, input_shape, num_classes):
    assert b.x_train.dtype == torch.float32 and b.y_train.dtype == torch.int64
    assert tuple(b.input_shape) == input_shape and b.num_classes == num_classes
    assert b.x_train.shape[1:] == input_shape and b.x_test.shape[1:] == input_shape
    assert len(b.x_train) == len(b.y_train) and len(b.x_test) == len(b.y_test)
    for x in (b.x_train, b.x_test):
        assert x.min() >= 0 and x.max() <= 1
    for y in (b.y_train, b.y_test):
        assert y.min() >= 0 and y.max() < num_classes
    mean, std = channel_stats(b.x_train)
    assert b.mean == pytest.approx(mean) and b.std == pytest.approx(std)
    assert b.spec.input_shape == input_shape


def _same_split(a, b):
    return torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)


def test_registry_and_defaults():
    assert DATASETS.names() == ["digits", "synthetic", "mnist", "fashion-mnist", "cifar10", "mnist1d", "imagefolder"]
    assert {"test_fraction", "n_samples", "noise", "kind"} <= set(DATASET_OPTIONS.names())
    for entry in DATASETS:
        assert "max_train" in entry.options and all(o.help for o in entry.options), entry.name
        assert all(DATASET_OPTIONS[o.name] is o for o in entry.options), entry.name  # one meaning per name
    assert DATASETS.entry("cifar10").options.names() == ["download", "max_train", "stream", "workers"]  # official split
    # a flat config (a train run's config.yaml) gives each dataset its own options
    flat = {**DATASET_OPTIONS.defaults(), "dataset": "digits", "max_train": 50}
    assert dataset_options_in("digits", flat) == {"test_fraction": 0.2, "max_train": 50}
    assert dataset_options_in("digits", {**flat, "kind": "spirals"})["kind"] == "spirals"  # rejected by the loader


def test_digits(digits):
    _check_bundle(digits, (1, 8, 8), 10)
    assert len(digits.y_train) + len(digits.y_test) == 1797
    assert len(digits.y_test) == pytest.approx(0.2 * 1797, abs=10)
    counts = torch.bincount(digits.y_test, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # stratified: ~36 per class
    assert digits.x_train.max() == 1.0  # pixel value 16 -> 1
    again = load_dataset("digits", seed=0)
    other = load_dataset("digits", seed=1)
    assert _same_split(digits, again) and not _same_split(digits, other)
    assert len(load_dataset("digits", seed=0, test_fraction=0.5).y_test) == pytest.approx(898, abs=10)


@pytest.mark.parametrize(
    "opts, shape, classes",
    [
        ({"kind": "moons"}, (2,), 2),
        ({"kind": "spirals", "n_classes": 3}, (2,), 3),
        ({"kind": "blobs", "n_classes": 4, "n_features": 5}, (5,), 4),
        ({"kind": "teacher-student", "n_classes": 3, "n_features": 10}, (10,), 3),
    ],
)
def test_synthetic_kinds(opts, shape, classes):
    b = load_dataset("synthetic", seed=3, n_samples=400, **opts)
    _check_bundle(b, shape, classes)
    assert len(b.y_train) + len(b.y_test) == 400 and len(b.y_test) == pytest.approx(80, abs=4)
    assert b.x_train.min() == 0 and b.x_train.max() == 1  # rescaled with the training range
    assert len(torch.unique(b.y_train)) == classes
    assert _same_split(b, load_dataset("synthetic", seed=3, n_samples=400, **opts))
    assert not _same_split(b, load_dataset("synthetic", seed=4, n_samples=400, **opts))


def test_teacher_student_noise_flips_labels():
    from gradlab.data.synthetic import _teacher_student

    x0, y0 = _teacher_student(np.random.default_rng(0), 4000, 0.0, 2, 4)
    x1, y1 = _teacher_student(np.random.default_rng(0), 4000, 0.5, 2, 4)
    assert np.array_equal(x0, x1)  # same inputs and teacher; only the labels are redrawn
    changed = (y0 != y1).mean()
    assert 0.2 < changed < 0.3  # half the labels redrawn uniformly over 2 classes: ~1/4 change


@pytest.mark.parametrize(
    "name, opts, needle",
    [
        ("synthetic", {"kind": "circles"}, "moons, spirals, blobs, teacher-student"),
        ("synthetic", {"kind": "moons", "n_classes": 3}, "exactly 2 classes"),
        ("synthetic", {"kind": "spirals", "n_features": 3}, "2-D"),
        ("synthetic", {"noise": -1.0}, "noise"),
        ("synthetic", {"n_samples": 5}, "n_samples"),
        ("digits", {"test_fraction": 1.0}, "test_fraction"),
        ("digits", {"test_fraction": 0}, "test_fraction"),
        ("digits", {"kind": "spirals"}, r"'kind' is an option of dataset synthetic, not of dataset digits \(its options: test_fraction, max_train\)"),
        ("cifar10", {"test_fraction": 0.5}, "'test_fraction' is an option of dataset digits, .*not of dataset cifar10"),
        ("synthetic", {"n_samples": "500"}, "is text, not a number"),
        ("mnist", {"download": 1}, r"invalid download: 1 \(must be true or false\)"),
        ("digits", {"max_train": -1}, "max_train"),
        ("digits", {"n_sampels": 10}, "unknown option 'n_sampels' of dataset digits; valid: max_train, test_fraction"),
        ("synthetic", {"n_sampels": 10}, "did you mean 'n_samples'"),
        ("imagenet", {}, "digits, synthetic, mnist, fashion-mnist, cifar10, mnist1d, imagefolder"),
    ],
)
def test_bad_dataset_options(name, opts, needle):
    with pytest.raises(GradlabError, match=needle):
        load_dataset(name, **opts)


def test_max_train_keeps_a_seeded_subset(digits):
    b = load_dataset("digits", seed=0, max_train=100)
    assert len(b.y_train) == 100 and torch.equal(b.y_test, digits.y_test)
    assert "100 of" in b.notes[-1]
    assert b.mean == pytest.approx(channel_stats(b.x_train)[0])


# ---- MNIST / Fashion-MNIST (IDX) -------------------------------------------------------------


def test_idx_reader_on_real_mnist(mnist_dir):
    labels = read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz", 1)
    assert labels.shape == (10000,) and labels[:5].tolist() == [7, 2, 1, 0, 4]
    images = read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz", 3)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8 and images.max() == 255


def test_mnist_test_only_folder_is_split(mnist_dir, no_network):
    b = load_dataset("mnist", seed=0, data_dir=mnist_dir)
    _check_bundle(b, (1, 28, 28), 10)
    assert not no_network  # files found: nothing downloaded
    assert len(b.y_train) == 8000 and len(b.y_test) == 2000
    assert len(b.notes) == 1 and "only the mnist test-set files" in b.notes[0] and "\n" not in b.notes[0]
    file_counts = np.bincount(read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz", 1), minlength=10)
    split_counts = torch.bincount(b.y_train, minlength=10) + torch.bincount(b.y_test, minlength=10)
    assert split_counts.tolist() == file_counts.tolist()  # a partition of the 10,000 test images
    assert torch.bincount(b.y_train, minlength=10).min() >= 700  # every digit well represented
    assert b.mean[0] == pytest.approx(0.13, abs=0.01) and b.std[0] == pytest.approx(0.31, abs=0.01)
    other = load_dataset("mnist", seed=1, data_dir=mnist_dir)
    assert not _same_split(b, other)


def test_mnist_found_through_gradlab_data_subfolder(mnist_dir, no_network, monkeypatch):
    monkeypatch.setenv("GRADLAB_DATA", str(mnist_dir.parent))  # holds mnist/
    b = load_dataset("mnist", seed=0)
    assert len(b.y_test) == 2000 and mnist_dir.name in b.notes[0]


def test_missing_files_give_one_clear_error(tmp_path, no_network):
    with pytest.raises(GradlabError) as info:
        load_dataset("mnist", data_dir=tmp_path / "nowhere")
    msg = str(info.value)
    assert all(f in msg for f in ALL_FILES) and str(tmp_path / "nowhere") in msg
    assert "download failed" in msg and "\n" not in msg
    assert no_network and no_network[0].endswith(ALL_FILES[0])  # a download was tried
    with pytest.raises(GradlabError, match="downloads disabled"):
        load_dataset("fashion-mnist", data_dir=tmp_path, download=False)


def _idx_bytes(arr: np.ndarray) -> bytes:
    magic = 2051 if arr.ndim == 3 else 2049
    head = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def _write_idx_set(folder, n_train, n_test, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte.gz": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": np.arange(n_test) % 10,
    }
    for name, arr in arrays.items():
        (folder / name).write_bytes(gzip.compress(_idx_bytes(arr)))
    return arrays


def test_full_idx_set_uses_the_official_split(tmp_path, no_network):
    arrays = _write_idx_set(tmp_path / "fashion-mnist", 30, 20)
    b = load_dataset("fashion-mnist", data_dir=tmp_path, seed=5)
    _check_bundle(b, (1, 28, 28), 10)
    assert b.notes == [] and len(b.y_train) == 30 and len(b.y_test) == 20
    expected = torch.tensor(arrays["train-images-idx3-ubyte.gz"][:, None] / 255, dtype=torch.float32)
    assert torch.allclose(b.x_train, expected)
    # The folder itself works too, and uncompressed files are accepted.
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in arrays:
        (flat / name.removesuffix(".gz")).write_bytes(gzip.decompress((tmp_path / "fashion-mnist" / name).read_bytes()))
    assert torch.equal(load_dataset("mnist", data_dir=flat).x_test, b.x_test)


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda raw: b"this is not gzip data", "corrupt or unreadable"),
        (lambda raw: gzip.compress(gzip.decompress(raw)[:-100]), "expected 15680"),  # truncated payload
        (lambda raw: gzip.compress(b"\x00\x00\x08\x01" + gzip.decompress(raw)[4:]), "magic number 2049"),
        (lambda raw: raw[: len(raw) // 2], "corrupt or unreadable"),  # truncated gzip stream
    ],
)
def test_corrupt_idx_file_is_named(tmp_path, no_network, damage, needle):
    _write_idx_set(tmp_path, 30, 20)
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(damage(bad.read_bytes()))
    with pytest.raises(GradlabError, match=needle) as info:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(bad) in str(info.value)


def test_mismatched_image_and_label_counts(tmp_path, no_network):
    _write_idx_set(tmp_path, 30, 20)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros(19))))
    with pytest.raises(GradlabError, match="20 images but .* 19 labels"):
        load_dataset("mnist", data_dir=tmp_path)


# ---- CIFAR-10 ---------------------------------------------------------------------------------


def _write_cifar(folder, n=4):
    """Batches in the real format: pickled dicts with bytes keys, uint8 (n, 3072) data, label lists."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        batch = {
            b"batch_label": name.encode(),
            b"labels": [(i + j) % 10 for j in range(n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img{j}.png".encode() for j in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


def test_cifar10_from_a_batch_folder(tmp_path, no_network):
    folder = _write_cifar(tmp_path / "cifar-10-batches-py")
    b = load_dataset("cifar10", data_dir=tmp_path)
    _check_bundle(b, (3, 32, 32), 10)
    assert len(b.y_train) == 20 and len(b.y_test) == 4 and len(b.mean) == 3 and len(b.std) == 3
    raw = pickle.loads((folder / "data_batch_1").read_bytes())
    assert torch.allclose(b.x_train[0], torch.tensor(raw[b"data"][0].reshape(3, 32, 32) / 255, dtype=torch.float32))
    assert b.y_train[:4].tolist() == raw[b"labels"]
    assert torch.equal(load_dataset("cifar10", data_dir=folder).x_test, b.x_test)  # the folder itself


class _Evil:
    def __reduce__(self):
        return (shutil.rmtree, ("/nonexistent-gradlab-path",))


def test_cifar10_refuses_unsafe_pickles_and_names_bad_files(tmp_path, no_network):
    folder = _write_cifar(tmp_path / "cifar-10-batches-py")
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": _Evil()}, protocol=2))
    with pytest.raises(GradlabError, match="refusing to load global shutil.rmtree") as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert "data_batch_3" in str(info.value)
    (folder / "data_batch_3").write_bytes((folder / "data_batch_2").read_bytes()[:500])
    with pytest.raises(GradlabError, match="corrupt CIFAR-10 batch .*data_batch_3"):
        load_dataset("cifar10", data_dir=tmp_path)
    (folder / "test_batch").unlink()
    with pytest.raises(GradlabError, match="test_batch") as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert "cifar-10-batches-py" in str(info.value) and "download failed" in str(info.value)


# ---- MNIST-1D ---------------------------------------------------------------------------------


def test_mnist1d_generation():
    t = templates()
    assert t.shape == (10, 12) and np.allclose(t[:, 0], 0)
    b = load_dataset("mnist1d", seed=0, n_samples=500)
    _check_bundle(b, (1, 40), 10)
    assert len(b.y_train) == 400 and len(b.y_test) == 100
    assert torch.bincount(b.y_train).tolist() == [40] * 10  # 50 per class, stratified split
    assert _same_split(b, load_dataset("mnist1d", seed=0, n_samples=500))
    assert not torch.equal(b.x_train, load_dataset("mnist1d", seed=1, n_samples=500).x_train)
    # Examples of one class differ (random pad, scale, shift, noise, shear), classes differ on average.
    x = b.x_train[:, 0].double()
    assert x[b.y_train == 0].std(0).mean() > 0.02
    centroids = torch.stack([x[b.y_train == c].mean(0) for c in range(10)])
    assert torch.cdist(centroids, centroids).fill_diagonal_(1).min() > 0


def test_mnist1d_is_learnable_beyond_chance():
    """A linear classifier beats chance (10%) clearly: the templates survive the transforms."""
    from sklearn.linear_model import LogisticRegression

    b = load_dataset("mnist1d", seed=0, n_samples=2000)
    clf = LogisticRegression(max_iter=300).fit(b.x_train[:, 0].numpy(), b.y_train.numpy())
    assert clf.score(b.x_test[:, 0].numpy(), b.y_test.numpy()) > 0.2
