"""Issue 14, "checked before anything runs": experiment files, signals under `gradlab run`,
typos answered without torch, and user mistakes that leave no run folder."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from clihelp import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_child_runs(monkeypatch):
    """Any attempt to start a child process fails the test: validation must stop the experiment
    before its first run. The manifest is read first, so that it needs no child either."""
    from gradlab.core.manifest import REGISTRIES, registry_view

    for kind in REGISTRIES:
        registry_view(kind)

    def refuse(*args, **kwargs):
        raise AssertionError(f"a child process was started: {args[:1]}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # not a terminal: nothing to ask


def _write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# -- every stage and combination is checked before the first run -------------------------------
def _bad_files(runs: str):
    train = {"command": "train", "epochs": 1, "runs_dir": runs}
    attack = {"command": "attack", "args": ["fgsm"], "run": "@previous", "eps": "0,0.1"}
    return [
        # (document, what the one line must hold)
        ({**train, "sweep": {"opt": ["sgd", "adamm"]}}, ["(opt=adamm)", "unknown optimizer 'adamm'", "did you mean 'adam'"]),
        ({**train, "sweep": {"lr": [0.1, "fast"]}}, ["(lr=fast)", "invalid lr: 'fast'"]),
        ({**train, "sweep": {"epochs": [1, 0]}}, ["(epochs=0)", "invalid epochs: 0"]),
        ({**train, "epochz": 2}, ["unknown key: epochz", "did you mean 'epochs'"]),
        ({**train, "sweep": {"seed": [0, 1]}, "hessian_power": 0.5},
         ["(seed=0)", "'hessian_power' is an option of optimizer adahessian"]),
        ({"steps": [train, {**attack, "epochz": 3}]}, ["step 2", "unknown key: epochz"]),
        ({"steps": [train, {**attack, "sweep": {"norm": ["linf", "l3"]}}]}, ["step 2 (norm=l3)", "invalid norm: 'l3'"]),
        ({"steps": [train, {**attack, "eps": "0,2"}]}, ["step 2", "invalid eps: 2.0"]),
        ({"steps": [train, {**attack, "args": ["fgsmm"]}]}, ["step 2", "unknown attack 'fgsmm'"]),
        ({"steps": [train, {"command": "probe-hesian", "run": "@previous"}]}, ["step 2", "unknown probe 'hesian'"]),
        ({"steps": [train, {"command": "trian"}]}, ["step 2", "unknown command 'trian'", "did you mean 'train'"]),
        ({"steps": [train, {"command": "optimize", "sweep": {"start": ["0,1", "nan,0"]}}]},
         ["step 2 (start=nan_0)", "invalid start point 'nan,0'"]),
        ({**train, "adv": "deepfool"}, ["invalid adv: 'deepfool'"]),  # needs the attack plug-ins: second pass
    ]


def test_a_mistake_anywhere_in_an_experiment_is_one_line_and_nothing_runs(tmp_path, capsys, no_child_runs):
    runs = tmp_path / "runs"
    for i, (doc, expect) in enumerate(_bad_files(str(runs))):
        f = _write(tmp_path / f"exp{i}.yaml", doc)
        r = cli(capsys, "run", f)
        lines = r.err.strip().splitlines()
        assert r.code == 2, (doc, r.err)
        assert len(lines) == 1 and lines[0].startswith(f"gradlab: error: {f}"), (doc, r.err)
        for part in expect:
            assert part in lines[0], (part, lines[0])
        assert not runs.exists(), doc


def test_an_experiment_says_how_many_runs_and_asks_above_1000(tmp_path, capsys, no_child_runs):
    f = _write(tmp_path / "big.yaml", {"command": "optimize", "steps": 5, "runs_dir": str(tmp_path / "runs"),
                                       "sweep": {"seed": list(range(1001))}})
    started = time.perf_counter()
    r = cli(capsys, "run", f)
    checked_in = time.perf_counter() - started
    assert r.code == 2 and "1,001 runs" in r.out, r.err
    assert r.err.strip() == f"gradlab: error: {f} makes 1,001 runs, more than 1,000: pass --yes to start them"
    assert not (tmp_path / "runs").exists()
    assert checked_in < 60  # 1,001 combinations checked, not run (a bound far above the ~1 s it takes)
    steps = _write(tmp_path / "steps.yaml", {"steps": [
        {"command": "train", "epochs": 1, "sweep": {"seed": [0, 1, 2]}},
        {"command": "attack", "args": ["fgsm"], "run": "@previous", "sweep": {"eps": [0.01, 0.1]}}]})
    r = cli(capsys, "run", steps, "--dry-run")
    assert r.code == 0 and f"{steps}: 9 runs (step 1: 3, step 2: 6)" in r.out


def test_yaml_exponents_are_numbers_in_config_set_and_sweep(tmp_path, no_child_runs):
    from gradlab.training.experiment import load_experiment
    from gradlab.training.options import TRAIN_OPTIONS
    from gradlab_cli._common import resolve_command
    from gradlab_cli.experiment import check_experiment
    from gradlab_cli.train import parse_set, train_slots

    conf = tmp_path / "c.yaml"
    conf.write_text("lr: 1e-3\ncheckpoint_seconds: 1.0e6\nepochs: 3e1\n")
    cfg = resolve_command(TRAIN_OPTIONS, conf, {}, slots=train_slots(), sets=parse_set(["adv_eps=3e-2"]))
    assert (cfg["lr"], cfg["checkpoint_seconds"], cfg["epochs"], cfg["adv_eps"]) == (1e-3, 1e6, 30, 0.03)
    exp = tmp_path / "e.yaml"
    exp.write_text("command: train\ncheckpoint_seconds: 1.0e6\nsweep:\n  lr: [1e-3, 3e4]\n")
    plans = check_experiment(exp, load_experiment(exp), None)
    assert [(p.resolved["lr"], p.resolved["checkpoint_seconds"]) for p in plans[0]] == [(1e-3, 1e6), (3e4, 1e6)]


# -- a typo is answered before torch is imported -----------------------------------------------
_NO_TORCH = """
import sys
from gradlab_cli.main import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    print("exit", e.code)
print("torch imported:", "torch" in sys.modules)
"""


def test_a_typo_is_answered_without_importing_torch(tmp_path):
    bad = _write(tmp_path / "bad.yaml", {"command": "train", "epochs": 1, "sweep": {"opt": ["sgd", "adamm"]}})
    key = _write(tmp_path / "key.yaml", {"command": "train", "epochz": 1})
    for argv in (["train", "--opt", "adamm"], ["train", "--lr", "fast"], ["train", "--set", "lr=fast"],
                 ["attack", "fgsmm"], ["attack", "fgsm", "--norm", "l3"], ["run", str(bad)], ["run", str(key)],
                 ["probe", "hesian"], ["probe", "hessian", "--top-k", "abc"], ["probe", "hessian", "--top-k", "0"],
                 ["probe", "gradnorm", "--threshold", "-1"], ["attack", "fgsm", "--eps", "5"], ["--help"], ["probe", "hessian", "--help"]):
        p = subprocess.run([sys.executable, "-c", _NO_TORCH, *argv], capture_output=True, text=True, cwd=tmp_path,
                           timeout=300)
        assert p.stdout.split()[-2:] == ["imported:", "False"], (argv, p.stdout, p.stderr)
        assert ("exit 0" if argv[-1] == "--help" else "exit 2") in p.stdout, (argv, p.stdout)


# -- user mistakes leave no run folder -----------------------------------------------------------
def test_bad_optimize_values_leave_no_run_folder(tmp_path, capsys):
    runs = tmp_path / "runs"
    for args, expect in ((["--lr", "inf"], "invalid lr: inf"), (["--start", "nan,0"], "invalid start point 'nan,0'"),
                         (["--start", "0,inf"], "not a finite number"), (["--cond", "-1"], "invalid cond")):
        r = cli(capsys, "optimize", "--runs-dir", runs, "--quiet", *args)
        assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and expect in r.err, (args, r.err)
        assert not runs.exists(), args


def test_optimize_with_every_path_diverged_completes_and_says_none_is_best(tmp_path, capsys):
    r = cli(capsys, "optimize", "--runs-dir", tmp_path, "--quiet", "--lr", "1e308", "--steps", "3", "--opt", "sgd,adam")
    assert r.code == 0 and "Traceback" not in r.err, r.err
    row = pd.read_csv(r.run_path / "summary.csv").iloc[0]
    assert row["status"] == "completed" and row["best_optimizer"] == "none"


def test_parse_numbers_rejects_non_finite_values_unless_asked():
    from gradlab.core.errors import GradlabError
    from gradlab.core.options import parse_numbers

    assert parse_numbers("0,1e-3", "eps") == [0.0, 1e-3]
    assert parse_numbers("1,inf", "range", finite=False) == [1.0, float("inf")]
    for text in ("nan", "0,inf", "-inf"):
        with pytest.raises(GradlabError, match="not a finite number"):
            parse_numbers(text, "start point")
    with pytest.raises(GradlabError, match="not a finite number"):
        parse_numbers("nan", "range", finite=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny train run on digits (10 classes)."""
    from gradlab_cli.main import main

    runs = tmp_path_factory.mktemp("runs")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--epochs", "1", "--runs-dir", str(runs), "--quiet", "--set", "max_train=200"])
    assert exc.value.code == 0
    return runs


def test_an_attack_on_a_class_the_model_lacks_leaves_no_run_folder(trained, capsys):
    before = sorted(p.name for p in trained.iterdir())
    r = cli(capsys, "attack", "fgsm", "--runs-dir", trained, "--target-class", "99", "--n-examples", "8", "--quiet")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
    assert "invalid target class: 99 (the model has 10 classes: must be in 0..9)" in r.err
    assert sorted(p.name for p in trained.iterdir()) == before


# -- --resume and --fail-fast ------------------------------------------------------------------
def _folders(runs: Path) -> list[str]:
    return sorted(p.name for p in runs.iterdir()) if runs.exists() else []


def test_resume_skips_the_combinations_whose_run_completed(tmp_path, capsys):
    runs = tmp_path / "runs"
    f = _write(tmp_path / "opt.yaml", {"command": "optimize", "steps": 4, "opt": "sgd", "runs_dir": str(runs),
                                       "sweep": {"fn": ["saddle", "quadratic"]}})
    r = cli(capsys, "run", f)
    assert r.code == 0, r.err
    first = _folders(runs)
    assert len(first) == 2
    r = cli(capsys, "run", f, "--resume")
    assert r.code == 0 and _folders(runs) == first, r.err  # nothing left to do
    assert r.out.count("completed (earlier run)") == 2
    quad = next(p for p in runs.iterdir() if "quadratic" in p.name)
    summary = pd.read_csv(quad / "summary.csv")
    summary.loc[0, "status"] = "failed"
    summary.to_csv(quad / "summary.csv", index=False)
    r = cli(capsys, "run", f, "--resume")
    assert r.code == 0, r.err
    new = sorted(set(_folders(runs)) - set(first))
    assert len(new) == 1 and "fn=quadratic" in new[0]  # only the combination that had not completed
    r = cli(capsys, "run", f, "--resume", "--runs-dir", tmp_path / "elsewhere")
    assert r.code == 0 and len(_folders(tmp_path / "elsewhere")) == 2  # another runs folder: nothing done yet


def test_config_matching_for_resume():
    from gradlab.training.experiment import config_matches

    stored = {"lr": 0.1, "betas": [0.9, 0.99], "run": "runs/../runs/a", "runs_dir": "x", "opt": "adam"}
    assert config_matches({"lr": 0.1, "betas": (0.9, 0.99), "run": "runs/a", "runs_dir": "y", "n": None}, stored)
    assert not config_matches({"lr": 0.2}, stored)
    assert not config_matches({"lr": 0.1, "epochs": 3}, stored)  # a key the run did not record
    assert not config_matches({"run": "runs/b"}, stored)


def test_fail_fast_stops_at_the_first_run_that_fails(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    f = _write(tmp_path / "att.yaml", {"command": "attack", "args": ["fgsm"], "runs_dir": str(runs),
                                       "sweep": {"run": ["missing-a", "missing-b", "missing-c"]}})
    r = cli(capsys, "run", f, "--fail-fast")
    assert r.code == 1
    assert "no run 'missing-a'" in r.err and "missing-b" not in r.err
    assert "--fail-fast: stopped at the first run that did not complete; 2 of 3 runs not started" in r.err


def test_eta_counts_only_the_runs_made():
    from gradlab.training.experiment import eta_seconds
    from gradlab_cli.experiment import format_eta

    assert eta_seconds(10.0, 0, 5) is None
    assert eta_seconds(30.0, 3, 7) == pytest.approx(70.0)
    assert (format_eta(None), format_eta(70.0), format_eta(3725.2)) == ("-", "1:10", "1:02:05")


# -- signals under `gradlab run` -------------------------------------------------------------------
def _children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid``, from /proc (no psutil)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads child processes from /proc")
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_gradlab_run_stops_its_child_cleanly_and_leaves_nothing(tmp_path, signum, code):
    runs, tmp = tmp_path / "runs", tmp_path / "tmp"
    tmp.mkdir()
    f = _write(tmp_path / "long.yaml", {"command": "train", "epochs": 1000, "batch_size": 16, "max_train": 400,
                                        "log_every_steps": 1, "runs_dir": str(runs), "sweep": {"seed": [0, 1]}})
    parent = subprocess.Popen([sys.executable, "-m", "gradlab", "run", str(f)], cwd=tmp_path,
                              env={**os.environ, "TMPDIR": str(tmp)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    child = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and parent.poll() is None:
            if child is None:
                found = [p for p in _children_of(parent.pid)
                         if b"train" in Path(f"/proc/{p}/cmdline").read_bytes()]
                child = found[0] if found else None
            metrics = list(runs.glob("*/metrics.csv"))
            if child is not None and metrics and len(metrics[0].read_text().splitlines()) > 3:
                break  # training is under way
            time.sleep(0.2)
        assert child is not None and parent.poll() is None, "the experiment never started training"
        assert list(tmp.glob("gradlab-exp-*")), "the experiment keeps its temporary files in TMPDIR"
        parent.send_signal(signum)
        out, err = parent.communicate(timeout=180)
        assert parent.returncode == code, (out, err)
        assert f"stopped by {signal.Signals(signum).name}" in err and "--resume" in err
        assert not _alive(child), "the run's process outlived gradlab run"
        assert not list(tmp.glob("gradlab-exp-*")), "the experiment's temporary files left behind"
        assert len(list(runs.iterdir())) == 1  # the second combination never started
        if signum == signal.SIGINT:  # the child's own clean stop: a checkpoint and its status
            run = next(runs.iterdir())
            assert pd.read_csv(run / "summary.csv").loc[0, "status"] == "interrupted"
            assert (run / "checkpoints" / "last.pt").is_file()
    finally:
        for pid in [child, parent.pid]:
            if pid is not None and _alive(pid):
                os.kill(pid, signal.SIGKILL)
        parent.wait(30)


def test_resume_continues_an_interrupted_train_run_of_the_sweep(tmp_path, capsys, monkeypatch):
    """A combination whose train run was interrupted (checkpoint kept) is continued with
    `gradlab train --resume`, not started again; the others run as usual."""
    from gradlab.runs import RunDir

    runs = tmp_path / "runs"
    log_metrics = RunDir.log_metrics
    sent = []

    def interrupt_in_second_epoch(self, step, epoch, split, metrics):
        log_metrics(self, step, epoch, split, metrics)
        if epoch is not None and epoch >= 1 and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGINT)  # one Ctrl-C: the run checkpoints at its next step

    monkeypatch.setattr(RunDir, "log_metrics", interrupt_in_second_epoch)
    r = cli(capsys, "train", "--epochs", "3", "--set", "max_train=200", "--seed", "1", "--runs-dir", runs, "--quiet")
    monkeypatch.setattr(RunDir, "log_metrics", log_metrics)
    assert r.code == 130, r.err
    stopped = r.run_path
    assert pd.read_csv(stopped / "summary.csv").loc[0, "status"] == "interrupted"
    assert (stopped / "checkpoints" / "last.pt").is_file()
    f = _write(tmp_path / "seeds.yaml", {"command": "train", "epochs": 3, "max_train": 200, "runs_dir": str(runs),
                                         "sweep": {"seed": [0, 1]}})
    r = cli(capsys, "run", f, "--resume")
    assert r.code == 0, r.err
    assert f"(continuing {stopped.name})" in r.out
    assert len(_folders(runs)) == 2  # seed 0 made its run; seed 1 went on in its own folder
    assert pd.read_csv(stopped / "summary.csv").loc[0, "status"] == "completed"
