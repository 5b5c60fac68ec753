"""`gradlab train --max-seconds`: a wall-time budget that ends the run cleanly (a final
evaluation and checkpoint, status completed, recorded in config.yaml and summary.csv)."""

import pandas as pd
import pytest
import torch
import yaml

from clihelp import cli

SMALL = ["--max-train", 96, "--batch-size", 32, "--width", 8, "--depth", 1, "--opt", "sgd", "--quiet"]


def test_a_spent_budget_stops_after_the_step_with_evaluation_and_checkpoint(tmp_path, capsys):
    # a budget far below one step's time: the run stops after its first step, mid-epoch
    r = cli(capsys, "train", "--runs-dir", tmp_path, "--epochs", 50, "--max-seconds", "1e-9", *SMALL)
    assert r.code == 0, r.err
    assert "time budget of 1e-09 s" in r.err and len(r.err.strip().splitlines()) == 1
    run = r.run_path
    s = pd.read_csv(run / "summary.csv").iloc[0]
    assert s["status"] == "completed" and bool(s["budget_reached"]) and int(s["steps"]) == 1
    m = pd.read_csv(run / "metrics.csv")
    test = m[m["split"] == "test"]
    assert set(test["step"]) == {1} and set(test["metric"]) == {"loss", "acc"}  # the final evaluation
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 1 and ckpt["train_seconds"] > 0
    assert yaml.safe_load((run / "config.yaml").read_text())["config"]["max_seconds"] == 1e-9


def test_an_ample_budget_changes_nothing(tmp_path, capsys):
    r = cli(capsys, "train", "--runs-dir", tmp_path, "--epochs", 1, "--max-seconds", 3600, *SMALL)
    assert r.code == 0 and r.err == "", r.err
    s = pd.read_csv(r.run_path / "summary.csv").iloc[0]
    assert not bool(s["budget_reached"]) and int(s["steps"]) == 3


@pytest.mark.parametrize("value", ["0", "-5", "nan", "soon"])
def test_a_bad_budget_is_one_line_and_no_run_folder(tmp_path, capsys, value):
    r = cli(capsys, "train", "--runs-dir", tmp_path, "--max-seconds", value, *SMALL)
    assert r.code == 2 and "max-seconds" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert not any(tmp_path.iterdir())


def test_under_torchrun_every_rank_stops_at_rank_0s_budget(tmp_path):
    import sys

    from clihelp import run_proc

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gradlab",
           "train", "--runs-dir", tmp_path, "--device", "cpu", "--epochs", 50, "--max-seconds", "1e-9",
           *[str(a) for a in SMALL]]
    r = run_proc([str(c) for c in cmd], env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.code == 0, r.err[-3000:]
    (run,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    s = pd.read_csv(run / "summary.csv").iloc[0]
    assert s["status"] == "completed" and bool(s["budget_reached"]) and int(s["steps"]) == 1
    assert s["grad_equivalents"] == pytest.approx(1)  # each rank's half batch counts as its share
