"""SIGTERM is Ctrl-C for every command, not only train: attack, probe, landscape, simplex and
connect stopped by a signal in the middle of their work say so in one line, exit with 128 + the
signal, and leave their run folder marked ``interrupted`` with what they had written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from clihelp import cli, gradlab_exe


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from clihelp import train_in_process

    runs = tmp_path_factory.mktemp("sig")
    a = train_in_process("--runs-dir", runs, "--epochs", "1", "--width", "16", "--set", "max_train=256", "--seed", "1",
                         "--quiet", "--device", "cpu")
    b = train_in_process("--runs-dir", runs, "--epochs", "1", "--width", "16", "--set", "max_train=256", "--seed", "2",
                         "--quiet", "--device", "cpu")
    return runs, a, b


def _signal_mid_work(monkeypatch, out_dir, signum, epochs_logged: int):
    """Send this process ``signum`` (a real signal, through its handler) at the third forward pass
    of the loaded model or ``torch.autograd.grad`` call (a Hessian probe runs one forward pass
    and many products on its graph) once the run folder exists and, for commands that log per
    epoch, ``epochs_logged`` rows are in its metrics.csv: the command is then in the middle of
    its work."""
    import torch

    import gradlab.training.load as load

    real_load, real_grad = load.load_run, torch.autograd.grad
    seen = {"n": 0, "sent": False}

    def ready() -> bool:
        folders = [d for d in out_dir.iterdir() if (d / "config.yaml").is_file()] if out_dir.is_dir() else []
        if not folders:
            return False
        metrics = folders[0] / "metrics.csv"
        rows = len(metrics.read_text().splitlines()) - 1 if metrics.is_file() else 0
        return rows >= epochs_logged

    def tick(*_):
        if not seen["sent"] and ready():
            seen["n"] += 1
            if seen["n"] == 3:
                seen["sent"] = True
                signal.raise_signal(signum)

    def loading(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        loaded.model.register_forward_pre_hook(tick)
        return loaded

    def grad(*args, **kwargs):
        tick()
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(load, "load_run", loading)
    monkeypatch.setattr(torch.autograd, "grad", grad)
    return seen


COMMANDS = {
    "attack": (lambda a, b: ["attack", "pgd", "--run", a, "--eps", "0,0.1", "--steps", "50", "--n-examples", "64",
                             "--grid", "0"], 0),
    "probe": (lambda a, b: ["probe", "hessian", "--run", a, "--top-k", "2", "--batches", "1", "--batch-size", "32",
                            "--no-trace"], 0),
    "landscape": (lambda a, b: ["probe", "landscape", "--run", a, "--dims", "1", "--steps", "9", "--batches", "1",
                                "--batch-size", "32"], 0),
    "simplex": (lambda a, b: ["simplex", "--run", a, "--vertices", "2", "--epochs", "3", "--samples", "2",
                              "--batch-size", "64"], 1),
    "connect": (lambda a, b: [  "connect", a, b, "--epochs", "3", "--points", "3", "--batch-size", "64"], 1),
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_work_is_one_line_exit_128_plus_it_and_an_interrupted_run(command, signum, two_runs, tmp_path,
                                                                              monkeypatch, capsys):
    runs, a, b = two_runs
    args, epochs_logged = COMMANDS[command]
    out = tmp_path / "out"
    seen = _signal_mid_work(monkeypatch, out, signum, epochs_logged)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    r = cli(capsys, *args(a, b), "--runs-dir", out, "--quiet", "--device", "cpu")
    assert seen["sent"], "the command ended before the signal was sent"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers given back
    assert r.code == 128 + signum, r.err
    (folder,) = [d for d in out.iterdir() if d.is_dir()]
    by = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
    assert r.err.splitlines() == [f"gradlab: interrupted by {by}: run {folder} marked interrupted "
                                  f"(what it wrote so far is kept)"], r.err
    assert r.run_path == folder
    summary = pd.read_csv(folder / "summary.csv").iloc[0]
    assert summary["status"] == "interrupted" and summary["error"] == f"interrupted by {by}"
    assert (folder / "config.yaml").is_file()
    if epochs_logged:  # the per-epoch rows written before the signal are kept
        assert len(pd.read_csv(folder / "metrics.csv")) >= epochs_logged


def test_sigterm_from_outside_ends_an_attack_with_one_line_no_traceback(two_runs, tmp_path):
    """A real SIGTERM from another process (what Slurm, `timeout` and torchrun's agent send)."""
    runs, a, _ = two_runs
    out = tmp_path / "out"
    p = subprocess.Popen([*gradlab_exe(), "attack", "pgd", "--run", str(a), "--eps", "0.1", "--steps", "100000",
                          "--n-examples", "64", "--grid", "0", "--runs-dir", str(out), "--quiet", "--device", "cpu"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out.is_dir() and any((d / "config.yaml").is_file() for d in out.iterdir())):
        assert p.poll() is None, p.communicate()
        assert time.time() < deadline, "no run folder after 120 s"
        time.sleep(0.05)
    time.sleep(0.2)  # in the attack's steps (100000 of them: minutes)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    (folder,) = [d for d in out.iterdir() if d.is_dir()]
    assert p.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines() == [f"gradlab: interrupted by SIGTERM: run {folder} marked interrupted "
                                           f"(what it wrote so far is kept)"], stderr
    assert stdout.strip().splitlines()[-1] == f"run: {folder}"
    assert pd.read_csv(folder / "summary.csv").iloc[0]["status"] == "interrupted"


@pytest.mark.slow
def test_sigterm_to_torchrun_ends_every_rank_of_an_attack_with_one_line(two_runs, tmp_path):
    """A scheduler stops the launcher (or torchrun's agent stops the survivors of a dead rank):
    each rank gets SIGTERM mid-attack; rank 0 marks the one run folder interrupted and says so,
    rank 1 names itself; no traceback."""
    runs, a, _ = two_runs
    out, logs = tmp_path / "out", tmp_path / "logs"
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "--redirects", "3", "--log-dir", str(logs), "-m", "gradlab", "--", "attack", "pgd", "--run",
                          str(a), "--eps", "0.1", "--steps", "100000", "--n-examples", "64", "--batch-size", "16",
                          "--grid", "0", "--runs-dir", str(out), "--quiet", "--device", "cpu"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while not (out.is_dir() and any((d / "config.yaml").is_file() for d in out.iterdir())):
        assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.time() < deadline, "no run folder after 300 s"
        time.sleep(0.05)
    time.sleep(0.5)  # both ranks in their batches' steps
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=120)
    assert p.returncode != 0
    err = {int(f.parent.name): f.read_text() for f in logs.rglob("stderr.log")}
    (folder,) = [d for d in out.iterdir() if d.is_dir()]  # rank 0's, the only one
    assert "Traceback" not in err[0] + err[1], err
    assert err[0].strip().splitlines() == [f"gradlab: interrupted by SIGTERM: run {folder} marked interrupted "
                                           f"(what it wrote so far is kept)"], err[0][-3000:]
    assert err[1].strip().splitlines() == ["gradlab: rank 1: interrupted by SIGTERM"], err[1][-3000:]
    assert pd.read_csv(folder / "summary.csv").iloc[0]["status"] == "interrupted"


def test_a_signal_before_any_run_folder_is_one_line(monkeypatch, capsys, tmp_path):
    """Stopped while it loads (no folder yet): one line, no folder made, 128 + the signal."""
    import gradlab.training.load as load

    def stop(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(load, "load_run", stop)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "config.yaml").write_text("command: train\nconfig: {}\n")
    (tmp_path / "runs" / "x" / "checkpoints").mkdir()
    (tmp_path / "runs" / "x" / "checkpoints" / "last.pt").write_bytes(b"")
    r = cli(capsys, "attack", "fgsm", "--run", tmp_path / "runs" / "x", "--runs-dir", tmp_path / "out", "--quiet",
            "--device", "cpu")
    assert r.code == 143 and r.err.splitlines() == ["gradlab: interrupted by SIGTERM"], r.err
    assert not (tmp_path / "out").exists()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
