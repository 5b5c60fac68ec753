"""`gradlab runs` at 80 columns: per-command headline columns, numbers never cut, --columns, --csv."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from clihelp import cli
from gradlab.runs import RunDir

LONG = "a-rather-long-run-name-for-a-sweep_lr=0.001_seed=3"


@pytest.fixture
def runs(tmp_path):
    """Runs of several commands with long names and numbers of every size (no training needed)."""
    d = tmp_path / "runs"
    for i, (opt, acc) in enumerate([("sgd", 0.9712345), ("curvature-gd", 0.123456789), ("adahessian", 1.0)]):
        cfg = {"model": "mypackage.models.resnets:make_wide_resnet" if i == 1 else "resnet56", "dataset": "mnist1d",
               "opt": opt, "seed": i}
        run = RunDir.create(d, "train", f"{LONG}-{i}", cfg, argv=["gradlab", "train"])
        run.finish("interrupted" if i == 2 else "completed",
                   {"train_loss": 0.0123, "train_acc": 0.99, "test_loss": 12345.678, "test_acc": acc,
                    "epochs": 15, "steps": 123456, "seconds": 98765.4321})
    run = RunDir.create(d, "attack", "pgd-sweep", {"run": "x", "attack": "pgd"}, argv=["gradlab", "attack"])
    run.finish("completed", {"attack": "pgd", "source_run": "x" * 40, "norm": "linf", "n": 360, "clean_acc": 0.9722,
                             "max_eps": 0.3, "robust_acc": 0.000277, "success_rate": 0.9997})
    run = RunDir.create(d, "probe-hessian", None, {"run": "x"}, argv=["gradlab", "probe"])
    run.finish("completed", {"lambda_max": 1933.123456, "trace": -0.000123456, "classification": "saddle",
                             "model": "plain56", "loss": 0.5})
    RunDir.create(d, "probe-jacobian", "still-going", {"run": "x"}, argv=["gradlab", "probe"])  # no summary yet
    return d


def _numbers(text: str) -> set:
    return set(re.findall(r"-?\d[\d.e+-]*", text))


def test_runs_fit_80_columns_and_numbers_are_never_cut(capsys, runs, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    r = cli(capsys, "runs", "--runs-dir", runs)
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert max(len(line) for line in lines) <= 80, "\n".join(line for line in lines if len(line) > 80)
    assert "…" not in r.out
    shown = _numbers(r.out)
    for number in ("0.9712", "0.1235", "1", "0.3", "0.9722", "0.000277", "1933", "-0.0001235"):
        assert number in shown, (number, r.out)
    # every command has its own table with its headline columns
    headers = [line.split() for line in lines if line.strip().startswith("run_id")]
    assert ["run_id", "model", "dataset", "opt", "status", "test_acc"] in headers
    assert ["run_id", "attack", "max_eps", "clean_acc", "robust_acc", "status"] in headers
    assert any(h[:1] == ["run_id"] and "lambda_max" in h and "trace" in h for h in headers)
    # long text wraps instead of being cut: the run_id column holds every id once unwrapped
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["run_id", "model"])
    end = next(i for i in range(header, len(lines)) if not lines[i].strip())
    first_column = "".join(line[: lines[header].index("model")].strip() for line in lines[header + 2: end])
    for p in runs.glob("*-train-*"):
        assert p.name in first_column, (p.name, first_column)
    assert "incomplete" in r.out and "interrupted" in r.out


def test_runs_columns_option_and_csv_keep_everything(capsys, runs, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    r = cli(capsys, "runs", "--runs-dir", runs, "--command", "train", "--columns", "opt,seconds,steps",
            "--csv", tmp_path / "all.csv")
    assert r.code == 0, r.err
    headers = [line.split() for line in r.out.splitlines() if line.strip().startswith("run_id")]
    assert headers == [["run_id", "opt", "seconds", "steps", "status"]]
    assert {"98765", "123456"} <= _numbers(r.out)  # whole numbers in full, no exponent below 1e9
    df = pd.read_csv(tmp_path / "all.csv")  # every column, not just the shown ones
    assert {"train_loss", "test_loss", "epochs", "seconds", "model", "seed"} <= set(df.columns)
    assert df.loc[df.opt == "curvature-gd", "test_acc"].item() == pytest.approx(0.123456789)
    r = cli(capsys, "runs", "--runs-dir", runs, "--columns", "opt,nope")
    assert r.code == 2 and "'nope'" in r.err and len(r.err.strip().splitlines()) == 1


def test_a_number_column_wider_than_the_terminal_is_not_cut(capsys, runs, monkeypatch):
    monkeypatch.setenv("COLUMNS", "30")
    r = cli(capsys, "runs", "--runs-dir", runs, "--command", "train", "--columns", "test_loss,seconds,steps")
    assert r.code == 0
    shown = _numbers(r.out)
    assert {"12346", "98765", "123456"} <= shown
