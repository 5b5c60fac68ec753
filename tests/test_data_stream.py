"""Streamed datasets (cifar10 and imagefolder with stream=true): the same examples, statistics and
splits as in memory, bounded caches, worker processes, and one-line errors for bad folders."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from gradlab.core.distributed import DistInfo
from gradlab.core.errors import GradlabError
from gradlab.data import load_dataset
from gradlab.data.cifar import CACHE_FILES
from gradlab.data.stream import block_permutation, eval_batches, to_bundle

SIZES = (3, 5, 2, 4, 6)  # examples per training file: uneven on purpose


def _write_cifar(folder, sizes=SIZES, test=5):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, n in zip(names, list(sizes) + [test]):
        batch = {b"labels": rng.integers(0, 10, n).tolist(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


def _same(a, b):
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("x_train", "y_train", "x_test", "y_test"))


def test_streamed_cifar_equals_in_memory_and_caches_few_files(tmp_path, no_network):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    mem = load_dataset("cifar10", data_dir=tmp_path)
    s = load_dataset("cifar10", data_dir=tmp_path, stream=True)
    assert s.blocks == list(SIZES) and len(s.train) == 20 and s.spec.input_shape == (3, 32, 32) == mem.spec.input_shape
    assert _same(to_bundle(s), mem)
    assert s.mean == pytest.approx(mem.mean, rel=1e-12) and s.std == pytest.approx(mem.std, rel=1e-12)
    for i in torch.randperm(20).tolist():  # random access keeps at most CACHE_FILES decoded files
        s.train[i]
        assert len(s.train._cache) <= CACHE_FILES
    with pytest.raises(GradlabError, match="streamed .*needs it in memory"):
        s.x_train
    sub, sub_mem = (load_dataset("cifar10", data_dir=tmp_path, max_train=7, **kw) for kw in ({"stream": True}, {}))
    assert torch.equal(to_bundle(sub).x_train, sub_mem.x_train) and sub.mean == pytest.approx(sub_mem.mean)


def test_streamed_cifar_keeps_the_safe_unpickler(tmp_path, no_network):
    folder = _write_cifar(tmp_path / "cifar-10-batches-py")
    good = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": _Evil()}, protocol=2))
    with pytest.raises(GradlabError, match="refusing to load global shutil.rmtree"):
        load_dataset("cifar10", data_dir=tmp_path, stream=True)
    (folder / "data_batch_2").write_bytes(good)
    s = load_dataset("cifar10", data_dir=tmp_path, stream=True)
    (folder / "data_batch_5").write_bytes(pickle.dumps({b"data": _Evil()}, protocol=2))  # swapped after loading
    with pytest.raises(GradlabError, match="refusing to load global .*|data_batch_5"):
        s.train[19]


class _Evil:
    def __reduce__(self):
        return (shutil.rmtree, ("/nonexistent-gradlab-path",))


def test_a_worker_process_reads_the_same_batches(tmp_path, no_network):
    _write_cifar(tmp_path / "c")
    s = load_dataset("cifar10", data_dir=tmp_path / "c", stream=True, workers=1)
    ref = load_dataset("cifar10", data_dir=tmp_path / "c", stream=True)
    for (x, y), (xr, yr) in zip(s.loader("test", 2), ref.loader("test", 2)):
        assert torch.equal(x, xr) and torch.equal(y, yr)


def test_eval_batches_shard_whole_batches_and_block_permutation():
    assert eval_batches(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    shares = [eval_batches(10, 2, DistInfo(r, 3)) for r in range(3)]
    assert sorted(i for sh in shares for b in sh for i in b) == list(range(10)) and len(shares[0]) == 2
    perm = block_permutation([3, 5, 2], torch.Generator().manual_seed(0))
    assert sorted(perm.tolist()) == list(range(10))
    runs = [set(perm[:3].tolist()), set(perm[:5].tolist()), set(perm[:2].tolist())]
    assert any(r in ({0, 1, 2}, set(range(3, 8)), {8, 9}) for r in runs)  # the first block is one file


def _write_images(root, classes=("cat", "dog", "eel"), per=4, size=(5, 6), mode="RGB"):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(root / c / f"{i}.png")


def test_imagefolder_seeded_split_stream_and_options(tmp_path):
    _write_images(tmp_path / "imgs")
    b = load_dataset("imagefolder", data_dir=tmp_path / "imgs", test_fraction=0.25)
    assert b.x_train.shape == (9, 3, 6, 5) and b.x_test.shape == (3, 3, 6, 5) and b.num_classes == 3
    assert sorted(b.y_test.tolist()) == [0, 1, 2] and "split its 12 images 9/3 by seed 0" in b.notes[0]
    raw = np.asarray(Image.open(sorted((tmp_path / "imgs" / "cat").iterdir())[0]))
    assert any(torch.allclose(x, torch.tensor(raw.transpose(2, 0, 1) / 255, dtype=torch.float32))
               for x in torch.cat([b.x_train, b.x_test]))
    other = load_dataset("imagefolder", data_dir=tmp_path / "imgs", test_fraction=0.25, seed=3)
    assert sorted(other.y_test.tolist()) == [0, 1, 2] and not torch.equal(other.x_test, b.x_test)  # seeded
    s = load_dataset("imagefolder", data_dir=tmp_path / "imgs", test_fraction=0.25, stream=True)
    assert _same(to_bundle(s), b) and s.mean == pytest.approx(b.mean, rel=1e-10)
    g = load_dataset("imagefolder", data_dir=tmp_path / "imgs", channels="gray", image_size=4)
    assert g.x_train.shape[1:] == (1, 4, 4) and g.spec.input_shape == (1, 4, 4)


def test_imagefolder_train_and_test_subfolders(tmp_path):
    _write_images(tmp_path / "r" / "train", per=3)
    _write_images(tmp_path / "r" / "val", classes=("dog",), per=2)
    b = load_dataset("imagefolder", data_dir=tmp_path / "r")
    assert len(b.y_train) == 9 and b.y_test.tolist() == [1, 1] and b.num_classes == 3 and not b.notes
    _write_images(tmp_path / "r" / "test", classes=("fox",), per=1)  # test/ wins over val/
    with pytest.raises(GradlabError, match="class 'fox' of .*test has no folder in .*train"):
        load_dataset("imagefolder", data_dir=tmp_path / "r")


def test_imagefolder_errors_are_one_line(tmp_path):
    with pytest.raises(GradlabError, match="no folder .*missing"):
        load_dataset("imagefolder", data_dir=tmp_path / "missing")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(GradlabError, match="no images in .*empty"):
        load_dataset("imagefolder", data_dir=tmp_path / "empty")
    _write_images(tmp_path / "mixed", classes=("a",), per=2)
    _write_images(tmp_path / "mixed2", classes=("b",), per=2, size=(7, 7))
    shutil.move(str(tmp_path / "mixed2" / "b"), str(tmp_path / "mixed" / "b"))
    with pytest.raises(GradlabError, match="is 7x7 but .* is 5x6: pass --image-size"):
        load_dataset("imagefolder", data_dir=tmp_path / "mixed")
    assert load_dataset("imagefolder", data_dir=tmp_path / "mixed", image_size=3).x_train.shape[1:] == (3, 3, 3)
    (tmp_path / "mixed" / "a" / "9.png").write_bytes(b"not a png")
    with pytest.raises(GradlabError, match="cannot read image .*9.png"):
        load_dataset("imagefolder", data_dir=tmp_path / "mixed", image_size=3)
