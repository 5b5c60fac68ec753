"""experiments/edge_of_stability.yaml: the file's grid, a tiny version of it run for real (full
batch: one step per epoch; the logged lambda_max is the full-batch Hessian's, checked against the
dense Hessian at the final weights), and its figure script on the runs it leaves."""

from __future__ import annotations

import runpy
from pathlib import Path

import pandas as pd
import torch
import yaml

from clihelp import cli

ROOT = Path(__file__).resolve().parents[1]
FILE = ROOT / "experiments/edge_of_stability.yaml"


def test_edge_of_stability_grid_is_full_batch_gd_at_three_rates_per_loss():
    from gradlab.training.experiment import load_experiment

    stages = load_experiment(FILE)
    assert [s.command for s in stages] == [["train"], ["train"]]
    combos = [c for s in stages for c in s.combinations()]
    assert sorted({c["loss"] for c in combos}) == ["cross-entropy", "mse"]
    for loss in ("mse", "cross-entropy"):
        assert len({c["lr"] for c in combos if c["loss"] == loss}) == 3
    for c in combos:  # plain GD on the whole training set, with the sharpness on a schedule
        assert c["opt"] == "sgd" and c["schedule"] == "constant" and c["batch_size"] >= c["max_train"] > 0
        assert c["probe"].startswith("hessian:every=")


def dense_hessian(model, loss_fn, x, y) -> torch.Tensor:
    """The loss Hessian over all of ``(x, y)`` in float64 by torch.func (the reference)."""
    model = model.double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(flat):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[i:i + s.numel()].reshape(s)
            i += s.numel()
        return loss_fn(torch.func.functional_call(model, params, (x.double(),)), y)

    return torch.func.hessian(loss_of)(flat0)


def test_tiny_edge_of_stability_run_and_figure(capsys, tmp_path):
    from gradlab.core.losses import loss_fn
    from gradlab.training.load import load_run

    doc = yaml.safe_load(FILE.read_text())
    for stage in doc["steps"]:
        stage.update(width=4, depth=1, n_samples=100, max_train=30, batch_size=30, epochs=4,
                     probe="hessian:every=2:tol=1e-6:trace_matvecs=4")
        stage["sweep"] = {"lr": stage["sweep"]["lr"][:1]}  # one rate per loss: this test is about the file
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(doc))
    res = cli(capsys, "run", path, "--runs-dir", tmp_path / "runs", "--yes")
    assert res.code == 0, res.err
    runs = sorted((tmp_path / "runs").glob("*/summary.csv"))
    assert len(runs) == 2
    for summary in runs:
        row = pd.read_csv(summary).iloc[0]
        assert row["steps"] == row["epochs"] == 4  # one full-batch step per epoch
        m = pd.read_csv(summary.parent / "metrics.csv")
        lam = m[(m["split"] == "curvature") & (m["metric"] == "lambda_max")]
        assert list(lam["step"]) == [2, 4]
        run = load_run(str(summary.parent))
        assert len(run.data.x_train) == 30
        hess = dense_hessian(run.model, loss_fn(run.config["loss"]), run.data.x_train, run.data.y_train)
        ref = float(torch.linalg.eigvalsh(hess)[-1])
        assert abs(lam["value"].iloc[-1] - ref) <= 1e-4 * abs(ref)
    plot = runpy.run_path(str(ROOT / "experiments/plot_edge_of_stability.py"))
    loaded = plot["load"](tmp_path / "runs")
    assert sorted(r["loss"] for r in loaded) == ["cross-entropy", "mse"]
    assert all(list(r["sharpness"].index) == [2, 4] and len(r["train_loss"]) == 4 for r in loaded)
    out = tmp_path / "fig.png"
    plot["main"](str(tmp_path / "runs"), str(out))
    assert out.stat().st_size > 1000
