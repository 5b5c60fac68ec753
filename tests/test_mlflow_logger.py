"""Issue 18: `--logger mlflow` mirrors a run folder into an MLflow run (an SQLite tracking store
that each test makes itself)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from clihelp import cli

pytest.importorskip("mlflow")
pytest.importorskip("sqlalchemy")


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_a_train_run_is_mirrored_into_mlflow(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    r = cli(capsys, "train", "--epochs", "2", "--set", "max_train=300", "--log-every-steps", "2", "--opt", "sgd",
            "--runs-dir", tmp_path / "runs", "--logger", "mlflow", "--mlflow-uri", uri, "--quiet")
    assert r.code == 0, r.err
    run_dir = r.run_path
    record = json.loads((run_dir / "mlflow.json").read_text())
    client = _client(uri)
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["gradlab.status"] == "completed"
    assert run.data.tags["gradlab.run_folder"] == str(run_dir.resolve())
    assert run.data.params["opt"] == "sgd" and float(run.data.params["lr"]) > 0
    rows = pd.read_csv(run_dir / "metrics.csv")
    for split, metric in [("train", "loss"), ("test", "acc")]:
        want = rows[(rows.split == split) & (rows.metric == metric)]
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"{split}/{metric}"))
        expected = sorted(zip(want.step, want.value))
        assert [s for s, _ in got] == [s for s, _ in expected] and len(got) >= 2
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-12)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.csv", "summary.csv"} <= artifacts


def test_a_resumed_folder_logs_into_the_same_mlflow_run(tmp_path):
    from gradlab.runs.mlflow_sink import MLflowSink

    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    folder = tmp_path / "runs" / "r1"
    folder.mkdir(parents=True)
    first = MLflowSink.start(folder, "train", {"lr": 0.1, "betas": [0.9, 0.99], "nested": {"a": 1}}, uri=uri)
    first.log_metrics(1, {"train/loss": 2.0}, 1.0)
    first.finish("interrupted", folder)
    assert _client(uri).get_run(first.run_id).info.status == "KILLED"
    again = MLflowSink.start(folder, "train", {"lr": 0.1}, uri=uri)
    assert again.run_id == first.run_id
    again.log_metrics(2, {"train/loss": float("inf")}, 2.0)
    again.finish("completed", folder)
    run = _client(uri).get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.params["nested.a"] == "1"
    history = sorted((m.step, m.value) for m in _client(uri).get_metric_history(first.run_id, "train/loss"))
    assert history[0] == (1, 2.0) and history[1][0] == 2 and history[1][1] != history[1][1]  # inf kept as NaN


def test_a_failing_mirror_never_stops_the_run(tmp_path):
    from gradlab.runs.folder import RunDir

    class Broken:
        def log_metrics(self, *a):
            raise ConnectionError("server went away\nsecond line")

        def finish(self, *a):
            raise AssertionError("a dropped mirror is not called again")

    run = RunDir.create(tmp_path, "train", None, {"lr": 0.1}, argv=["gradlab"])
    run.attach(Broken())
    run.log_metrics(1, 0, "train", {"loss": 1.0})
    run.log_metrics(2, 0, "train", {"loss": 0.5})
    run.finish("completed")
    assert run.sink_errors == ["Broken stopped: server went away"]
    assert len(pd.read_csv(run.path / "metrics.csv")) == 2


def test_an_unusable_tracking_store_is_one_line_and_no_run_folder(tmp_path, capsys):
    r = cli(capsys, "train", "--epochs", "1", "--set", "max_train=100", "--runs-dir", tmp_path / "runs",
            "--logger", "mlflow", "--mlflow-uri", "nosuchscheme://x", "--quiet")
    assert r.code == 2, (r.out, r.err)
    assert "cannot use the tracking store nosuchscheme://x" in r.err and len(r.err.strip().splitlines()) == 1
    assert not [p for p in (tmp_path / "runs").iterdir() if (p / "config.yaml").exists()]


def test_mlflow_missing_is_named(tmp_path, monkeypatch):
    import sys

    from gradlab.core.errors import GradlabError
    from gradlab.runs.mlflow_sink import MLflowSink

    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    monkeypatch.setitem(sys.modules, "mlflow.entities", None)
    with pytest.raises(GradlabError, match=r"pip install 'gradlab\[mlflow\]'"):
        MLflowSink.start(tmp_path, "train", {})
