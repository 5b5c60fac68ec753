"""experiments/residual_scale.yaml runs (a tiny version of the same file) and its figure script
draws from the runs it leaves."""

from __future__ import annotations

import runpy
from pathlib import Path

import pandas as pd
import yaml

from clihelp import cli

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_residual_scale_experiment(capsys, tmp_path):
    doc = yaml.safe_load((ROOT / "experiments/residual_scale.yaml").read_text())
    step = doc["steps"][0]
    assert step["command"] == "probe-jacobian" and set(step["sweep"]) == {"residual_scale", "depth"}
    step.update(width=6, examples=2)
    step["sweep"] = {"residual_scale": [0.0, 0.5], "depth": [2]}  # two child runs: this test is about the file
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(doc))
    res = cli(capsys, "run", path, "--runs-dir", tmp_path / "runs", "--yes")
    assert res.code == 0, res.err
    rows = pd.concat([pd.read_csv(p) for p in (tmp_path / "runs").glob("*/summary.csv")])
    assert len(rows) == 2
    ident = rows[rows["residual_scale"] == 0.0]
    assert (ident["block_log_abs_det"] == 0).all() and (ident["block_trace_minus_n"] == 0).all()
    assert (rows[rows["residual_scale"] == 0.5]["block_log_abs_det"] != 0).all()
    out = tmp_path / "fig.png"
    runpy.run_path(str(ROOT / "experiments/plot_residual_scale.py"))["main"](str(tmp_path / "runs"), str(out))
    assert out.stat().st_size > 1000
