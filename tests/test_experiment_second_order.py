"""experiments/second_order.yaml runs (a tiny version of the same file) and its figure script
draws from the runs it leaves: test accuracy against wall time and gradient-equivalents."""

from __future__ import annotations

import runpy
from pathlib import Path

import yaml

from clihelp import cli

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_second_order_experiment(capsys, tmp_path):
    from gradlab.optim import OPTIMIZERS

    doc = yaml.safe_load((ROOT / "experiments/second_order.yaml").read_text())
    assert doc["command"] == "train" and doc["max_seconds"] > 0 and set(doc["sweep"]) == {"model", "opt"}
    assert set(doc["sweep"]["model"]) == {"mlp", "cnn"}
    second = {"adahessian", "lbfgs", "sr1", "newton", "saddle-free-newton", "natural-gd", "kfac", "sam", "asam"}
    assert second | {"sgd", "momentum", "adam"} == set(doc["sweep"]["opt"]) <= set(OPTIMIZERS.names())
    # a budget below one step's time: each run stops after its first step with a test evaluation
    doc.update(max_seconds=1e-9, max_train=64, batch_size=32)
    doc["sweep"] = {"model": ["mlp", "cnn"], "opt": ["sam"]}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(doc))
    res = cli(capsys, "run", path, "--runs-dir", tmp_path / "runs", "--yes")
    assert res.code == 0, res.err
    plot = runpy.run_path(str(ROOT / "experiments/plot_second_order.py"))
    runs = plot["load"](tmp_path / "runs")
    assert sorted(runs["model"]) == ["cnn", "mlp"] and set(runs["step"]) == {1}
    assert set(runs["grad_eq"]) == {2.0} and (runs["seconds"] >= 0).all()  # SAM: two gradients per step
    out = tmp_path / "fig.png"
    plot["main"](str(tmp_path / "runs"), str(out))
    assert out.stat().st_size > 1000 and "sam" in capsys.readouterr().out
