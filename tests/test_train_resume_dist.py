"""Processes that die, get interrupted, or run in pairs under torchrun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from clihelp import cli, gradlab_exe, run_proc, train_in_process

pytestmark = pytest.mark.slow

# Small but not trivial: 8 epochs of 400 examples, batch 32 -> 13 steps per epoch. Every step
# logged and last.pt written at every epoch's end: _start counts rows, and a SIGKILL needs an
# epoch's checkpoint (tests/test_train_callbacks.py resumes with the default cadences).
ARGS = ["--epochs", "8", "--batch-size", "32", "--seed", "3", "--set", "max_train=400", "--width", "64",
        "--log-every-steps", "1", "--checkpoint-seconds", "0"]


def _values(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "metrics.csv")[["step", "epoch", "split", "metric", "value"]].reset_index(drop=True)


def _final(run: Path) -> dict:
    s = pd.read_csv(run / "summary.csv").iloc[0]
    return {k: s[k] for k in ("status", "train_loss", "train_acc", "test_loss", "test_acc", "epochs", "steps")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, in this process (torch on one thread, tests/conftest.py)."""
    return train_in_process("--runs-dir", tmp_path_factory.mktemp("ref"), *ARGS)


def _start(runs: Path) -> tuple[subprocess.Popen, Path]:
    """The installed console script, on one thread as this process: the same arithmetic as the
    reference and as the resume, which runs in this process."""
    p = subprocess.Popen(gradlab_exe() + ["train", "--runs-dir", str(runs), "--quiet", *ARGS],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    while time.time() < deadline:
        runs_found = [d for d in runs.iterdir()] if runs.exists() else []
        if runs_found and (runs_found[0] / "checkpoints" / "last.pt").exists():
            m = runs_found[0] / "metrics.csv"
            # Wait until training is part-way into the epoch after the first checkpoint.
            if m.exists() and sum(1 for _ in open(m)) > 3 * 13 + 4 + 3 * 5:
                return p, runs_found[0]
        time.sleep(0.05)
    p.kill()
    raise AssertionError("training never reached its second epoch")


def test_resume_after_sigkill_mid_epoch_matches_uninterrupted(tmp_path, reference, capsys):
    p, run = _start(tmp_path)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (run / "summary.csv").exists()
    r = cli(capsys, "train", "--resume", run, "--quiet")
    assert r.code == 0, r.err
    assert r.run_path == run
    assert _final(run) == _final(reference)
    pd.testing.assert_frame_equal(_values(run), _values(reference))


def test_ctrl_c_writes_checkpoint_and_status_interrupted(tmp_path, reference, capsys):
    p, run = _start(tmp_path)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert pd.read_csv(run / "summary.csv").loc[0, "status"] == "interrupted"
    assert out.strip().splitlines()[-1] == f"run: {run}"
    r = cli(capsys, "train", "--resume", run, "--quiet")
    assert r.code == 0, r.err
    assert _final(run) == _final(reference)
    pd.testing.assert_frame_equal(_values(run), _values(reference))


def test_resume_refuses_non_train_runs(tmp_path, capsys):
    from gradlab.runs.folder import RunDir

    probe = RunDir.create(tmp_path, "probe-hessian", None, {})
    probe.save_checkpoint({"step": 0})
    r = cli(capsys, "train", "--resume", probe.path)
    assert r.code == 2 and "not a train run" in r.err


def test_torchrun_two_processes_match_one_process(tmp_path, reference):
    env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "gradlab", "train", "--runs-dir", tmp_path, "--quiet", "--device", "cpu", *ARGS]
    r = run_proc(cmd, env=env, timeout=600)
    assert r.code == 0, r.err[-3000:]
    runs = [d for d in tmp_path.iterdir() if d.is_dir()]
    assert len(runs) == 1  # only rank 0 writes a run folder
    dist, ref = _values(runs[0]), _values(reference)
    assert dist[["step", "epoch", "split", "metric"]].equals(ref[["step", "epoch", "split", "metric"]])
    # Same global batches; only the order of floating-point reductions differs.
    pd.testing.assert_series_equal(dist["value"], ref["value"], rtol=2e-4, atol=1e-5)
    assert _final(runs[0])["status"] == "completed"
