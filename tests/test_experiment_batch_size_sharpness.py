"""experiments/batch_size_sharpness.yaml: its stages (one model and lr, batch sizes up to the
whole training set, each train run probed on the whole training split), a tiny version run for
real (lambda_max and trace checked against the dense Hessian of the full-split loss at the final
weights), and its figure script on the runs it leaves."""

from __future__ import annotations

import runpy
from pathlib import Path

import torch
import yaml

from clihelp import cli
from test_experiment_edge_of_stability import dense_hessian

ROOT = Path(__file__).resolve().parents[1]
FILE = ROOT / "experiments/batch_size_sharpness.yaml"
DIGITS_TRAIN = 1438  # digits' training split at the default test fraction


def test_batch_size_stages_alternate_train_and_full_split_probe():
    from gradlab.training.experiment import load_experiment

    stages = load_experiment(FILE)
    trains, probes = stages[0::2], stages[1::2]
    assert len(trains) == len(probes) >= 3
    assert all(s.command == ["train"] for s in trains)
    assert all(s.command == ["probe", "hessian"] and s.base["run"] == "@previous" for s in probes)
    sizes = [s.base["batch_size"] for s in trains]
    assert sizes == sorted(set(sizes)) and sizes[-1] == DIGITS_TRAIN  # the last one is full-batch GD
    # one recipe: only the batch size and the epochs differ between the train stages
    recipe = lambda s: {k: v for k, v in s.base.items() if k not in ("batch_size", "epochs")}  # noqa: E731
    assert all(recipe(s) == recipe(trains[0]) and s.sweep == trains[0].sweep for s in trains)
    assert set(trains[0].sweep) <= {"seed"}  # repeats of one recipe, nothing else swept
    assert all(s.base["split"] == "train" and s.base["batches"] == 1 and s.base["batch_size"] >= DIGITS_TRAIN
               for s in probes)


def test_tiny_batch_size_sharpness_run_and_figure(capsys, tmp_path):
    from gradlab.core.losses import loss_fn
    from gradlab.training.load import load_run

    doc = yaml.safe_load(FILE.read_text())
    train, probe = doc["steps"][0], doc["steps"][1]
    tiny = dict(train, width=4, depth=1, max_train=24)
    tiny.pop("sweep", None)  # one seed: this test is about the file
    doc["steps"] = [dict(tiny, batch_size=8, epochs=2), probe, dict(tiny, batch_size=24, epochs=3), probe]
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(doc))
    res = cli(capsys, "run", path, "--runs-dir", tmp_path / "runs", "--yes")
    assert res.code == 0, res.err
    plot = runpy.run_path(str(ROOT / "experiments/plot_batch_size_sharpness.py"))
    runs = plot["load"](tmp_path / "runs")
    assert list(runs["batch_size"]) == [8, 24] and list(runs["steps"]) == [6, 3]
    for train_dir in sorted((tmp_path / "runs").glob("*-train")):
        run = load_run(str(train_dir))
        hess = dense_hessian(run.model, loss_fn(run.config["loss"]), run.data.x_train, run.data.y_train)
        row = runs[runs["batch_size"] == run.config["batch_size"]].iloc[0]
        assert abs(row["lambda_max"] - float(torch.linalg.eigvalsh(hess)[-1])) <= 2e-3 * row["lambda_max"]
        ref_trace = float(torch.trace(hess))
        assert abs(row["trace"] - ref_trace) <= 4 * row["trace_stderr"] + 1e-4 * abs(ref_trace)
    out = tmp_path / "fig.png"
    plot["main"](str(tmp_path / "runs"), str(out))
    assert out.stat().st_size > 1000
