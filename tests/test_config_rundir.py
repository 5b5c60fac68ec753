"""Config resolution and the run-folder contract, without training."""

from __future__ import annotations

import csv

import pandas as pd
import pytest

from gradlab.config import load_yaml, resolve
from gradlab.errors import GradlabError
from gradlab.rundir import METRIC_COLUMNS, RunDir, find_run, load_checkpoint, read_config, validate_run_name


def test_resolve_precedence_and_unknown_keys():
    d = {"lr": 0.1, "epochs": 3, "batch_size": 8}
    assert resolve(d, {"epochs": 5, "batch-size": 16}, {"epochs": 7, "lr": None}) == {"lr": 0.1, "epochs": 7, "batch_size": 16}
    with pytest.raises(GradlabError, match="unknown key in config file: colour"):
        resolve(d, {"colour": 1}, {})
    with pytest.raises(GradlabError, match="valid keys: batch_size, epochs, lr"):
        resolve(d, {}, {"nope": 1})


def test_yaml_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(GradlabError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\nepochs: [1, 2\n")
    with pytest.raises(GradlabError, match=r"malformed YAML in .*bad\.yaml \(line"):
        load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(GradlabError, match="expected a mapping"):
        load_yaml(lst)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("x: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(GradlabError, match="malformed YAML"):
        load_yaml(unsafe)


@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", "..", "", " x"])
def test_bad_run_names(name):
    with pytest.raises(GradlabError, match="invalid run name"):
        validate_run_name(name)


def test_run_folder_contract(tmp_path):
    run = RunDir.create(tmp_path, "train", "t1", {"lr": 0.1, "seed": 3}, argv=["gradlab", "train"])
    assert run.path.name.endswith("-train-t1")
    assert (run.path / "checkpoints").is_dir() and (run.path / "plots").is_dir()
    doc = read_config(run.path)
    assert doc["config"] == {"lr": 0.1, "seed": 3}
    assert set(doc["versions"]) == {"gradlab", "torch", "python"} and doc["command_line"] == "gradlab train"
    run.log_metrics(1, 0, "train-step", {"loss": 2.5, "lr": 0.1})
    run.log_metrics(2, 0, "train-step", {"loss": 2.0, "lr": 0.1})
    # Flushed as it goes: readable before the run ends.
    rows = list(csv.DictReader(open(run.path / "metrics.csv")))
    assert list(rows[0]) == METRIC_COLUMNS and len(rows) == 4
    run.finish("completed", {"test_acc": 0.9, "note": "a,b"})
    s = pd.read_csv(run.path / "summary.csv")
    assert list(s.columns[:3]) == ["run_id", "command", "status"] and len(s) == 1
    assert s.loc[0, "status"] == "completed" and s.loc[0, "note"] == "a,b"
    assert not list(run.path.glob(".*.tmp"))


def test_context_manager_marks_failures(tmp_path):
    with pytest.raises(RuntimeError):
        with RunDir.create(tmp_path, "probe-x", None, {}) as run:
            raise RuntimeError("boom")
    assert pd.read_csv(run.path / "summary.csv").loc[0, "status"] == "failed"
    with pytest.raises(KeyboardInterrupt):
        with RunDir.create(tmp_path, "probe-y", None, {}) as run2:
            raise KeyboardInterrupt
    assert pd.read_csv(run2.path / "summary.csv").loc[0, "status"] == "interrupted"


def test_reopen_drops_rows_after_the_checkpoint_and_torn_lines(tmp_path):
    run = RunDir.create(tmp_path, "train", None, {})
    for step in range(1, 6):
        run.log_metrics(step, 0, "train-step", {"loss": 1.0 / step})
    run.close()
    with open(run.path / "metrics.csv", "a") as f:
        f.write("6,0,train-st")  # killed mid-write
    RunDir.reopen(run.path, 3)
    df = pd.read_csv(run.path / "metrics.csv")
    assert df["step"].tolist() == [1, 2, 3]


def test_find_run(tmp_path):
    with pytest.raises(GradlabError, match="run `gradlab train` first"):
        find_run(tmp_path, "last")
    a = RunDir.create(tmp_path, "train", "a", {})
    a.save_checkpoint({"step": 1})
    b = RunDir.create(tmp_path, "probe-jacobian", "b", {})
    assert find_run(tmp_path, "last") == b.path
    assert find_run(tmp_path, "last", require_checkpoint=True) == a.path
    assert find_run(tmp_path, a.path.name) == a.path
    with pytest.raises(GradlabError, match="no checkpoint"):
        find_run(tmp_path, str(b.path), require_checkpoint=True)
    (tmp_path / "junk").mkdir()
    with pytest.raises(GradlabError, match="not a gradlab run folder"):
        find_run(tmp_path, str(tmp_path / "junk"))
    assert load_checkpoint(a.path / "checkpoints" / "last.pt") == {"step": 1}
    (a.path / "checkpoints" / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(GradlabError, match="cannot read checkpoint"):
        load_checkpoint(a.path / "checkpoints" / "bad.pt")
