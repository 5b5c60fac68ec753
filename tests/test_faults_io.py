"""A run folder that cannot be written: a full disk, a read-only folder. Each ends with one line
naming the cause, status ``failed`` where summary.csv can still be written, the previous
checkpoint kept and resumable, no traceback and a nonzero exit; a read-only folder is named
before any data loads.

The tests run as any user (root too, whom permissions do not stop), so the errors are injected
where the operating system raises them: ``fsync`` for a full disk (where a buffered write's
ENOSPC surfaces), ``open`` for a read-only file system, ``os.open`` for the up-front probe.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pandas as pd
import pytest

from clihelp import cli
from gradlab.runs import load_checkpoint

# 2 epochs of 16 steps; last.pt at each epoch's end (the second one is where the faults strike).
ARGS = ["--epochs", "2", "--batch-size", "16", "--seed", "4", "--width", "16", "--set", "max_train=256",
        "--checkpoint-seconds", "0", "--quiet"]


@pytest.fixture
def reference(tmp_path, capsys):
    r = cli(capsys, "train", "--runs-dir", tmp_path / "ref", *ARGS)
    assert r.code == 0, r.err
    return r.run_path


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _assert_one_line(r, start: str) -> str:
    lines = r.err.strip().splitlines()
    assert r.code != 0 and len(lines) == 1 and lines[0].startswith(start), r.err
    assert "Traceback" not in r.err and "inline_container" not in r.err
    return lines[0]


def _assert_resumes_like(run: Path, ref: Path, capsys) -> None:
    """The checkpoint of epoch 1 is the one on disk, whole, and resuming from it ends as the
    uninterrupted run."""
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 16)
    assert not list(run.rglob("*.tmp"))
    r = cli(capsys, "train", "--resume", run, "--quiet")
    assert r.code == 0, r.err
    got, want = (pd.read_csv(p / "summary.csv").iloc[0] for p in (run, ref))
    assert got["status"] == "completed" and got["steps"] == want["steps"] == 32
    assert got["test_acc"] == pytest.approx(want["test_acc"]) and got["train_loss"] == pytest.approx(want["train_loss"])
    cols = ["step", "epoch", "split", "metric", "value"]
    pd.testing.assert_frame_equal(pd.read_csv(run / "metrics.csv")[cols], pd.read_csv(ref / "metrics.csv")[cols])


def test_disk_full_writing_a_checkpoint(tmp_path, capsys, monkeypatch, reference):
    real_fsync, writes = os.fsync, []

    def fsync(fd):
        if _fd_path(fd).endswith(".last.pt.tmp"):
            writes.append(fd)
            if len(writes) >= 2:  # the first checkpoint fits, the second does not
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    r = cli(capsys, "train", "--runs-dir", tmp_path / "runs", *ARGS)
    run = r.run_path
    line = _assert_one_line(r, "gradlab: no space left on device writing ")
    assert line.endswith(str(run / "checkpoints" / "last.pt"))
    assert pd.read_csv(run / "summary.csv").loc[0, "status"] == "failed"
    monkeypatch.undo()
    _assert_resumes_like(run, reference, capsys)


def test_disk_full_writing_a_metrics_row(tmp_path, capsys, monkeypatch, reference):
    from gradlab.runs.logging import MetricsCSV

    real_write = MetricsCSV.write

    def write(self, step, epoch, split, metrics, wall, *cost):
        if step > 20:  # in epoch 2, after epoch 1's checkpoint
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, step, epoch, split, metrics, wall, *cost)

    monkeypatch.setattr(MetricsCSV, "write", write)
    r = cli(capsys, "train", "--runs-dir", tmp_path / "runs", *ARGS)
    run = r.run_path
    _assert_one_line(r, f"gradlab: no space left on device writing {run}")
    assert pd.read_csv(run / "summary.csv").loc[0, "status"] == "failed"
    monkeypatch.undo()
    _assert_resumes_like(run, reference, capsys)


def test_folder_turning_read_only_during_training(tmp_path, capsys, monkeypatch, reference):
    from gradlab.runs import checkpoints

    opened = []

    def read_only_after_the_first_checkpoint(path, *args, **kw):
        opened.append(path)
        if sum(1 for p in opened if str(p).endswith(".last.pt.tmp")) >= 2:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return open(path, *args, **kw)

    # open() as the atomic writer of checkpoints and summary.csv sees it (the name it looks up first)
    monkeypatch.setattr(checkpoints, "open", read_only_after_the_first_checkpoint, raising=False)
    r = cli(capsys, "train", "--runs-dir", tmp_path / "runs", *ARGS)
    run = r.run_path
    line = _assert_one_line(r, f"gradlab: runs folder {run} is not writable (read-only file system)")
    assert line.endswith(f"writing {run / 'checkpoints' / 'last.pt'}")  # the file, not its temporary
    assert not (run / "summary.csv").exists()  # it cannot be written: the one line says why
    monkeypatch.undo()
    _assert_resumes_like(run, reference, capsys)


def _refuse_probe(monkeypatch):
    real_open = os.open

    def os_open(path, flags, *args, **kw):
        if ".gradlab-write-probe" in str(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", os_open)


def test_a_read_only_runs_folder_is_named_before_any_data_loads(tmp_path, capsys, monkeypatch):
    from gradlab.training import loop

    def no_training(*a, **k):
        raise AssertionError("data and model were built for a folder that cannot be written")

    monkeypatch.setattr(loop.Trainer, "__init__", no_training)
    _refuse_probe(monkeypatch)
    runs = tmp_path / "runs"
    r = cli(capsys, "train", "--runs-dir", runs, *ARGS)
    assert r.code == 2
    _assert_one_line(r, f"gradlab: error: runs folder {runs} is not writable (read-only file system)")
    assert not runs.exists()  # the probe looked in the nearest folder that exists, and made none


def test_resuming_in_a_read_only_run_folder_changes_nothing(tmp_path, capsys, monkeypatch, reference):
    before = {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()}
    ckpt = reference / "checkpoints" / "last.pt"
    state = load_checkpoint(ckpt)
    state["epoch"], state["step"], state["batch_in_epoch"] = 1, 16, 0  # as if stopped after epoch 1
    import torch

    torch.save(state, ckpt)
    before[ckpt] = ckpt.read_bytes()
    _refuse_probe(monkeypatch)
    r = cli(capsys, "train", "--resume", reference)
    _assert_one_line(r, f"gradlab: error: run folder {reference} is not writable (read-only file system)")
    assert {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()} == before


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not stop root")
def test_a_runs_folder_without_write_permission(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o555)
    try:
        r = cli(capsys, "train", "--runs-dir", runs, *ARGS)
        _assert_one_line(r, f"gradlab: error: runs folder {runs} is not writable (permission denied)")
        assert not any(runs.iterdir())
    finally:
        runs.chmod(0o755)
