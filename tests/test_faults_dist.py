"""Faults under torchrun. A rank that dies: the surviving rank ends within seconds with one line
naming the dead rank, status ``failed`` in summary.csv and the last checkpoint kept to resume
from; no traceback from it and no hang. SIGTERM to the launcher: every rank stops cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from clihelp import cli
from gradlab.runs import load_checkpoint

pytestmark = pytest.mark.slow

# 2 epochs of 16 global steps; last.pt at each epoch's end.
ARGS = ["--epochs", "2", "--batch-size", "16", "--seed", "5", "--width", "16", "--set", "max_train=256",
        "--checkpoint-seconds", "0", "--log-every-steps", "1"]
HELPER = Path(__file__).with_name("faults_train.py")


def _rank_logs(logs: Path) -> dict:
    """torchrun --redirects 3 --log-dir: each local rank's stderr, by rank."""
    return {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}


def test_a_dead_rank_ends_the_survivor_with_one_line_and_a_resumable_run(tmp_path, capsys):
    """Rank 1 dies in step 24 (epoch 2). Checkpoints every 0.2 s, steps of at least 0.05 s: the
    last one before the death is from inside epoch 2 (rank 0's clock asks, both ranks agree on
    the step), and one process resumes from it to the uninterrupted run's end."""
    runs, logs = tmp_path / "runs", tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--redirects", "3",
           "--log-dir", str(logs), str(HELPER), "0.05", "1:24", "--", "--runs-dir", str(runs), "--quiet",
           "--device", "cpu", *ARGS, "--checkpoint-seconds", "0.2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode != 0
    err = _rank_logs(logs)
    assert set(err) == {0, 1}, p.stderr[-3000:]
    killed_at = float(re.search(r"killed at ([0-9.]+)", err[1]).group(1))
    lines = err[0].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradlab: rank 1 of 2 exited: "), err[0][-3000:]
    assert "Traceback" not in err[0]
    (run,) = [d for d in runs.iterdir() if d.is_dir()]
    summary = pd.read_csv(run / "summary.csv").iloc[0]
    assert summary["status"] == "failed"
    assert (run / "summary.csv").stat().st_mtime - killed_at < 15  # ended within seconds, not at a timeout
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 1 and 16 < ckpt["step"] < 24 and ckpt["batch_in_epoch"] == ckpt["step"] - 16
    r = cli(capsys, "train", "--resume", run, "--quiet")  # one process continues the run
    assert r.code == 0, r.err
    r = cli(capsys, "train", "--runs-dir", tmp_path / "ref", "--quiet", *ARGS)
    assert r.code == 0, r.err
    done, ref = (pd.read_csv(p / "summary.csv").iloc[0] for p in (run, r.run_path))
    assert (done["status"], done["steps"]) == ("completed", 32)
    for k in ("train_loss", "train_acc", "test_loss", "test_acc"):  # the same global batches
        assert done[k] == pytest.approx(ref[k], rel=2e-4, abs=1e-5), k


def test_sigterm_to_torchrun_stops_every_rank_at_one_step_with_a_checkpoint(tmp_path, capsys):
    """A scheduler stops the launcher: torchrun passes SIGTERM to its workers, which stop at the
    same step boundary, write last.pt there and status interrupted, and say how to resume."""
    runs, logs = tmp_path / "runs", tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--redirects", "3",
           "--log-dir", str(logs), str(HELPER), "0.1", "--", "--runs-dir", str(runs), "--quiet", "--device", "cpu",
           *ARGS]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline:
        found = [d for d in runs.iterdir() if d.is_dir()] if runs.exists() else []
        if found and (found[0] / "metrics.csv").exists() and "train-step" in (found[0] / "metrics.csv").read_text():
            break
        assert p.poll() is None, p.communicate()[1][-3000:]
        time.sleep(0.02)
    else:
        p.kill()
        raise AssertionError("no step logged")
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=120)
    err = _rank_logs(logs)
    lines = err[0].strip().splitlines()
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "--resume" in lines[0], err[0][-3000:]
    assert "Traceback" not in err[0] + err[1]
    run = found[0]
    stopped = pd.read_csv(run / "summary.csv").iloc[0]
    assert stopped["status"] == "interrupted" and 1 <= stopped["steps"] < 32
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == stopped["steps"]
    r = cli(capsys, "train", "--resume", run, "--quiet")
    assert r.code == 0, r.err
    done = pd.read_csv(run / "summary.csv").iloc[0]
    assert (done["status"], done["steps"]) == ("completed", 32)
