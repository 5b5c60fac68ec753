"""``--resume`` works for every registered optimizer, after Ctrl-C and after SIGKILL, and the
resumed run ends with what an uninterrupted run logs: the same final metrics and the same
metrics.csv, each step once, and in TensorBoard each step once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from clihelp import cli, train_in_process
from gradlab.optim import OPTIMIZERS
from gradlab.runs import RunDir

OPTS = OPTIMIZERS.names()
# 3 epochs of 96 examples at batch 32 (3 steps an epoch) of a 16-wide MLP: the whole file runs in
# well under a minute, and every optimizer still takes steps that its state and RNG must carry.
# Every step logged, and last.pt at every epoch's end (a time limit on checkpoints would skip
# epoch 1's, which the kill must find on disk).
ARGS = ["--epochs", "3", "--batch-size", "32", "--seed", "1", "--width", "16", "--set", "max_train=96",
        "--log-every-steps", "1", "--checkpoint-seconds", "0"]
STEPS = 9


@pytest.fixture(scope="module")
def _kill_process(tmp_path_factory):
    """The helper process that trains one run per optimizer and SIGKILLs itself in their second
    epochs (tests/kill_after_first_epoch.py); started first, it runs while the references train."""
    runs = tmp_path_factory.mktemp("killed")
    script = Path(__file__).with_name("kill_after_first_epoch.py")
    p = subprocess.Popen([sys.executable, str(script), str(runs), *OPTS, "--", *ARGS],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    yield runs, p
    if p.poll() is None:
        p.kill()
        p.communicate()


@pytest.fixture(scope="module")
def references(_kill_process, tmp_path_factory):
    """An uninterrupted run per optimizer."""
    runs = tmp_path_factory.mktemp("ref")
    return {opt: train_in_process("--runs-dir", runs / opt, "--opt", opt, *ARGS) for opt in OPTS}


@pytest.fixture(scope="module")
def killed(_kill_process, references) -> Path:
    runs, p = _kill_process
    _, err = p.communicate(timeout=600)
    assert p.returncode == -signal.SIGKILL, err[-3000:]
    return runs


def _values(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "metrics.csv")[["step", "epoch", "split", "metric", "value"]]


def _tb_steps(run: Path, tag: str = "train-step/loss") -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run), size_guidance={"scalars": 0})
    ea.Reload()
    return [(s.step, s.value) for s in ea.Scalars(tag)]


def _assert_same_as_uninterrupted(run: Path, ref: Path) -> None:
    got, want = (pd.read_csv(p / "summary.csv").iloc[0] for p in (run, ref))
    assert got["status"] == want["status"] == "completed"
    assert (got["epochs"], got["steps"]) == (want["epochs"], want["steps"]) == (3, STEPS)
    for k in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-9), k
    # Every row once, with the uninterrupted run's values: nothing lost, nothing twice.
    pd.testing.assert_frame_equal(_values(run), _values(ref), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("opt", OPTS)
def test_resume_after_ctrl_c_matches_uninterrupted(opt, references, tmp_path, capsys, monkeypatch):
    log_metrics, sent = RunDir.log_metrics, []

    def log_then_press_ctrl_c(self, step, epoch, split, metrics):
        log_metrics(self, step, epoch, split, metrics)
        if epoch is not None and epoch >= 1 and not sent:  # in the second of three epochs
            sent.append(step)
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends

    monkeypatch.setattr(RunDir, "log_metrics", log_then_press_ctrl_c)
    r = cli(capsys, "train", "--runs-dir", tmp_path, "--opt", opt, "--quiet", *ARGS)
    assert sent and r.code == 130, r.err
    run = r.run_path
    stopped = pd.read_csv(run / "summary.csv").iloc[0]
    assert stopped["status"] == "interrupted" and stopped["steps"] < STEPS
    monkeypatch.undo()
    r = cli(capsys, "train", "--resume", run, "--quiet")
    assert r.code == 0, r.err
    assert r.run_path == run
    _assert_same_as_uninterrupted(run, references[opt])
    got, want = _tb_steps(run), _tb_steps(references[opt])
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, STEPS + 1))
    assert [v for _, v in got] == pytest.approx([v for _, v in want])


@pytest.mark.parametrize("opt", OPTS)
def test_resume_after_sigkill_matches_uninterrupted(opt, killed, references, capsys):
    (run,) = (killed / opt).iterdir()
    assert not (run / "summary.csv").exists()
    assert _values(run)["epoch"].max() >= 1  # killed with rows logged past the checkpoint
    r = cli(capsys, "train", "--resume", run, "--quiet")
    assert r.code == 0, r.err
    _assert_same_as_uninterrupted(run, references[opt])
    # In TensorBoard each step shows once, with the uninterrupted value (a kill may lose the
    # events of its last second, never add any).
    want = dict(_tb_steps(references[opt]))
    got = _tb_steps(run)
    steps = [s for s, _ in got]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS
    assert [v for _, v in got] == pytest.approx([want[s] for s in steps])
