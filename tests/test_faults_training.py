"""Interrupted runs lose nothing: SIGTERM is Ctrl-C, a run killed in its first epoch resumes,
an epoch is reported only once its checkpoint is on disk, TensorBoard shows each step once after
a resume; divergence stops at the step it happens; resuming a completed run changes nothing;
the training bar says ``epoch k/N``.

The processes that get signals are real (``tests/faults_train.py`` runs ``gradlab train`` with a
pause after each step, so a signal lands mid-run); their resumed runs are compared with an
uninterrupted run: the same summary, the same metrics.csv, and each step once in TensorBoard.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from clihelp import cli, train_in_process
from gradlab.runs import RunDir, load_checkpoint

# 2 epochs of 256 examples at batch 16 (16 steps an epoch) of a 16-wide MLP; every step logged.
ARGS = ["--epochs", "2", "--batch-size", "16", "--seed", "2", "--width", "16", "--set", "max_train=256",
        "--log-every-steps", "1"]
STEPS = 32
HELPER = Path(__file__).with_name("faults_train.py")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return train_in_process("--runs-dir", tmp_path_factory.mktemp("ref"), *ARGS)


def _start(runs: Path, pause: float, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HELPER), str(pause), "--", "--runs-dir", str(runs), "--quiet",
                             *ARGS, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for(p: subprocess.Popen, what: str, ready, timeout: float = 240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = ready()
        if got:
            return got
        if p.poll() is not None:
            out, err = p.communicate()
            raise AssertionError(f"training ended (exit {p.returncode}) before {what}: {err[-2000:]}")
        time.sleep(0.01)
    p.kill()
    p.communicate()
    raise AssertionError(f"training never reached {what}")


def _run_folder(runs: Path):
    found = [d for d in runs.iterdir() if d.is_dir()] if runs.exists() else []
    return found[0] if found else None


def _metrics(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "metrics.csv")[["step", "epoch", "split", "metric", "value"]]


def _summary(run: Path) -> pd.Series:
    return pd.read_csv(run / "summary.csv").iloc[0]


def _tb_steps(run: Path, tag: str = "train-step/loss") -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run), size_guidance={"scalars": 0})
    ea.Reload()
    return [(s.step, s.value) for s in ea.Scalars(tag)]


def _assert_same_as_uninterrupted(run: Path, ref: Path) -> None:
    got, want = _summary(run), _summary(ref)
    assert got["status"] == want["status"] == "completed"
    assert (got["epochs"], got["steps"]) == (want["epochs"], want["steps"]) == (2, STEPS)
    for k in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-9), k
    pd.testing.assert_frame_equal(_metrics(run), _metrics(ref), rtol=1e-6, atol=1e-9)
    # TensorBoard: every step exactly once, in order, with the uninterrupted run's values.
    for tag in ("train-step/loss", "test/acc"):
        got_tb, want_tb = _tb_steps(run, tag), _tb_steps(ref, tag)
        assert [s for s, _ in got_tb] == [s for s, _ in want_tb], tag
        assert [v for _, v in got_tb] == pytest.approx([v for _, v in want_tb]), tag
    assert [s for s, _ in _tb_steps(run)] == list(range(1, STEPS + 1))


def test_sigterm_is_ctrl_c_checkpoint_status_one_line_exit_143_and_resume_matches(tmp_path, reference, capsys):
    p = _start(tmp_path, 0.1, "--checkpoint-seconds", "0")
    run = _wait_for(p, "its first logged step", lambda: (r := _run_folder(tmp_path)) and (r / "metrics.csv").exists()
                    and "train-step" in (r / "metrics.csv").read_text() and r)
    p.send_signal(signal.SIGTERM)  # what a scheduler, `timeout` and `kill` send
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "SIGTERM" in lines[0] and f"gradlab train --resume {run}" in lines[0], err
    assert out.strip().splitlines()[-1] == f"run: {run}"
    stopped = _summary(run)
    assert stopped["status"] == "interrupted" and 1 <= stopped["steps"] < STEPS
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == stopped["steps"]  # at the current step
    r = cli(capsys, "train", "--resume", run, "--quiet")
    assert r.code == 0, r.err
    _assert_same_as_uninterrupted(run, reference)


def test_a_run_killed_in_its_first_seconds_resumes_and_no_stale_tmp_is_left(tmp_path, reference, capsys):
    """A checkpoint exists after the first checkpoint_seconds, inside the first epoch: SIGKILL
    then, leave the temporary files a kill mid-write would, and resume."""
    p = _start(tmp_path, 0.1, "--checkpoint-seconds", "0.2")
    run = _wait_for(p, "a checkpoint in its first epoch",
                    lambda: (r := _run_folder(tmp_path)) and (r / "checkpoints" / "last.pt").exists() and r)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 0 and 0 < ckpt["batch_in_epoch"] < 16  # from inside epoch 1
    assert not (run / "summary.csv").exists()
    for stale in (run / "checkpoints" / ".last.pt.tmp", run / ".summary.csv.tmp"):
        stale.write_bytes(b"half a file")
    r = cli(capsys, "train", "--resume", run, "--quiet")
    assert r.code == 0, r.err
    assert not list(run.rglob("*.tmp"))
    _assert_same_as_uninterrupted(run, reference)


@pytest.mark.parametrize("seconds", ["0", "30"])
def test_an_epoch_is_reported_only_once_its_checkpoint_is_on_disk(tmp_path, capsys, monkeypatch, seconds):
    """Every epoch's rows (0: a checkpoint every epoch), or the first epoch's (30 s: the first
    epoch's end still writes one), appear only when last.pt holds that epoch's end."""
    seen, log_metrics = [], RunDir.log_metrics

    def check_then_log(self, step, epoch, split, metrics):
        if split in ("train", "test"):
            path = self.path / "checkpoints" / "last.pt"
            ckpt = load_checkpoint(path) if path.exists() else {"step": None, "epoch": None}
            seen.append((split, epoch, ckpt["epoch"], ckpt["step"] == step))
        log_metrics(self, step, epoch, split, metrics)

    monkeypatch.setattr(RunDir, "log_metrics", check_then_log)
    r = cli(capsys, "train", "--runs-dir", tmp_path, "--quiet", *ARGS[:-2], "--checkpoint-seconds", seconds)
    assert r.code == 0, r.err
    epochs = [0, 1] if seconds == "0" else [0]
    want = [(split, e, e + 1, True) for e in epochs for split in ("train", "test")]
    assert [s for s in seen if s[1] in epochs] == want


def test_rows_of_an_epoch_whose_checkpoint_was_written_are_written_on_resume(tmp_path, reference, capsys):
    """Killed after epoch 1's checkpoint is on disk and before its rows: the resumed run writes
    them, once (the checkpoint carries them)."""
    from gradlab.training.callbacks import Callback
    from gradlab.training.loop import Trainer

    class Killed(Exception):
        pass

    class KillBeforeRows(Callback):
        order = -1  # before the callback that writes the rows

        def on_epoch_report(self, trainer, info):
            raise Killed

    cfg = _config(tmp_path, checkpoint_seconds=0)
    run = RunDir.create(tmp_path, "train", None, cfg, argv=["gradlab", "train"])
    with pytest.raises(Killed):
        Trainer(cfg, callbacks=[KillBeforeRows()]).fit(run)
    run.close()
    assert load_checkpoint(run.path / "checkpoints" / "last.pt")["epoch"] == 1
    assert "test" not in set(_metrics(run.path)["split"])
    r = cli(capsys, "train", "--resume", run.path, "--quiet")
    assert r.code == 0, r.err
    _assert_same_as_uninterrupted(run.path, reference)


def _config(tmp_path, **over) -> dict:
    """The config of ``gradlab train ARGS`` as a dict for the Python API."""
    from gradlab.training.options import train_defaults, validate_train_config

    cfg = {**train_defaults(), "runs_dir": str(tmp_path), "name": None, "seed": 2, "device": "cpu", "epochs": 2,
           "batch_size": 16, "width": 16, "max_train": 256, "log_every_steps": 1}
    return validate_train_config({**cfg, **over})


def _fit(cfg, callbacks=()):
    from gradlab.training.loop import Trainer

    run = RunDir.create(cfg["runs_dir"], "train", None, cfg, argv=["gradlab", "train"])
    result = Trainer(cfg, callbacks=callbacks).fit(run)
    run.finish(result.status, result.metrics)
    return result, run.path


def _at_step(step: int, fn):
    """A callback that replaces the loss of training step ``step`` by ``fn(loss)``."""
    from gradlab.training.callbacks import Callback

    class AtStep(Callback):
        def transform_loss(self, trainer, x, y, out, loss, n_global):
            return fn(loss) if trainer.step + 1 == step else loss

    return AtStep()


class _InfGrad(torch.autograd.Function):
    """The identity, with an infinite gradient: a finite loss whose backward overflows."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


@pytest.mark.parametrize("how, step, over, words", [
    ("loss x 1e5", 20, {}, "exceeded"),  # above 1e3 x the first epoch's mean loss, still finite
    ("loss x 3", 4, {"max_loss": 5.0}, "(--max-loss)"),
    ("inf gradient", 5, {}, "gradient norm became NaN/inf"),
])
def test_divergence_stops_at_the_step_it_happens(tmp_path, how, step, over, words):
    fn = {"loss x 1e5": lambda loss: loss * 1e5, "loss x 3": lambda loss: loss * 3,
          "inf gradient": _InfGrad.apply}[how]
    result, run = _fit(_config(tmp_path, **over), [_at_step(step, fn)])
    assert result.status == "diverged", how
    assert result.metrics["steps"] == step - 1 and f"at step {step} " in result.message and words in result.message
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")  # the position before that step
    assert ckpt["step"] == step - 1 and all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert _summary(run)["status"] == "diverged"


def test_a_rise_from_near_zero_loss_is_not_divergence(tmp_path):
    """A run whose first epoch's losses are tiny (a pretrained model) may rise to a plain
    cross-entropy: the default bound is at least 1e3 x ln C, the loss of a uniform guess."""
    from gradlab.training.callbacks import Callback

    class TinyLossButAtStep20(Callback):
        def transform_loss(self, trainer, x, y, out, loss, n_global):
            return loss if trainer.step + 1 == 20 else loss * 1e-4

    result, run = _fit(_config(tmp_path), [TinyLossButAtStep20()])
    assert result.status == "completed", result.message


def test_a_huge_learning_rate_never_ends_completed(tmp_path, capsys):
    r = cli(capsys, "train", "--runs-dir", tmp_path, "--lr", "1e6", "--epochs", "3", "--set", "max_train=400",
            "--quiet")
    assert r.code == 1, r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "diverged" in lines[0] and "lr 1e+06" in lines[0], r.err
    assert _summary(r.run_path)["status"] == "diverged"


def test_max_loss_flag(tmp_path, capsys):
    r = cli(capsys, "train", "--runs-dir", tmp_path / "a", "--max-loss", "1", *ARGS, "--quiet")
    assert r.code == 1 and "exceeded 1 (--max-loss) at step 1 " in r.err, r.err
    assert _summary(r.run_path)["steps"] == 0
    r = cli(capsys, "train", "--runs-dir", tmp_path / "b", "--max-loss", "0", *ARGS)
    assert r.code == 2 and "invalid max-loss: 0" in r.err and not (tmp_path / "b").exists()


def test_resuming_a_completed_run_says_so_and_changes_nothing(tmp_path, capsys):
    r = cli(capsys, "train", "--runs-dir", tmp_path, "--quiet", *ARGS)
    assert r.code == 0, r.err
    run = r.run_path

    def snapshot():
        return {p.relative_to(run): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.rglob("*")) if p.is_file()}

    before = snapshot()
    r = cli(capsys, "train", "--resume", run)
    assert r.code == 0, r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "already completed" in lines[0] and str(run) in lines[0], r.err
    assert r.run_path == run
    assert snapshot() == before


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "\n", text)


def test_training_bar_says_epoch_k_of_n_prints_each_epoch_and_no_nan(tmp_path, capsys, monkeypatch):
    from rich.console import Console

    import gradlab_cli.train as train_cli

    buf = io.StringIO()
    monkeypatch.setattr(train_cli, "console", Console(file=buf, force_terminal=True, width=160))
    r = cli(capsys, "train", "--runs-dir", tmp_path, *ARGS[:-2])
    assert r.code == 0, r.err
    text = _strip_ansi(buf.getvalue())
    assert "epoch 1/2" in text and "nan" not in text.lower()
    line = re.compile(r"^epoch (\d)/2  train loss \d\.\d{4} acc \d\.\d{4}  test loss \d\.\d{4} acc \d\.\d{4}$")
    epochs = [int(m.group(1)) for m in map(line.match, text.splitlines()) if m]
    assert epochs == [1, 2], text
    m = _metrics(r.run_path)
    test_acc = m[(m.split == "test") & (m.metric == "acc")]["value"].tolist()
    assert f"test loss {m[(m.split == 'test') & (m.metric == 'loss')]['value'].iloc[-1]:.4f} acc {test_acc[-1]:.4f}" in text
    # Not on a terminal (a pipe, a log file): the same lines, no bar.
    monkeypatch.undo()
    r = cli(capsys, "train", "--runs-dir", tmp_path / "piped", *ARGS[:-2])
    assert [int(m.group(1)) for m in map(line.match, r.out.splitlines()) if m] == [1, 2], r.out


def test_deferred_interrupt_records_the_first_signal_raises_on_the_second_and_restores_handlers():
    from gradlab.training.interrupts import DeferredInterrupt

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    di = DeferredInterrupt()
    with di:
        with di:  # re-entrant: the inner block keeps the outer one's handlers
            signal.raise_signal(signal.SIGTERM)
        assert di.requested and di.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        di.escalate = False  # training has stopped: later signals only wait
        signal.raise_signal(signal.SIGTERM)
        assert di.signum == signal.SIGTERM
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
