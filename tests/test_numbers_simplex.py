"""`gradlab simplex` says plainly whether its ensemble beat the model it grew from (issue 14,
"Simplex ensembles"): a summary line, even with --quiet, and fields in summary.csv."""

from __future__ import annotations

import pandas as pd
import pytest

from clihelp import cli
from gradlab.landscape.simplex import SIMPLEX_OPTIONS, ensemble_verdict


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two MLPs (width 32) on 400 digits: one epoch (under-trained) and eight epochs."""
    from gradlab_cli.main import main

    root = tmp_path_factory.mktemp("runs")
    for name, epochs in (("short", 1), ("long", 8)):
        try:
            main(["train", "--runs-dir", str(root), "--width", "32", "--epochs", str(epochs), "--name", name,
                  "--set", "max_train=400", "--quiet"])
        except SystemExit as e:
            assert e.code in (0, None)
    return root, {p.name.split("-")[-1]: p for p in root.iterdir() if p.is_dir()}


def _simplex(capsys, root, run, *args):
    r = cli(capsys, "simplex", "--runs-dir", root, "--run", run, "--vertices", 3, "--samples", 5, "--quiet", *args)
    assert r.code == 0, r.err
    return r, pd.read_csv(r.run_path / "summary.csv").iloc[0]


def test_an_ensemble_that_beats_its_base_says_so(runs, capsys):
    root, by = runs
    # one epoch of Adam leaves the base far from trained: two epochs per vertex improve on it
    r, summary = _simplex(capsys, root, by["short"], "--epochs", 2)
    assert summary["ensemble_acc"] > summary["single_acc"]
    assert bool(summary["ensemble_beats_base"]) and summary["ensemble_gain"] > 0
    assert "ensemble beat the base model: accuracy" in r.out
    assert "NOT" not in r.out


def test_an_ensemble_that_does_not_beat_its_base_says_so(runs, capsys):
    root, by = runs
    # a tiny budget: vertices far from the trained weights (init scale 3) barely trained
    r, summary = _simplex(capsys, root, by["long"], "--epochs", 1, "--lr", 1e-5, "--init-scale", 3)
    assert summary["ensemble_acc"] <= summary["single_acc"]
    assert not bool(summary["ensemble_beats_base"])
    line = next(ln for ln in r.out.splitlines() if ln.startswith("ensemble did NOT beat the base model"))
    n = int(summary["n_eval"])
    assert f"of {n} examples" in line and "--epochs" in line
    assert summary["ensemble_gain"] == pytest.approx(summary["ensemble_acc"] - summary["single_acc"])


def test_verdict_counts_examples():
    m = {"ensemble_acc": 0.9721, "single_acc": 0.9749, "ensemble_loss": 0.123, "single_loss": 0.120,
         "n_eval": 359, "ensemble_gain": 0.9721 - 0.9749, "ensemble_beats_base": False}
    assert "-1 of 359 examples" in ensemble_verdict(m)


def test_defaults_train_the_vertices_longer_than_before():
    # Benton et al. 2021 train each new vertex for a sizeable share of the original budget; the
    # former 5 epochs at lr 0.05 left the vertices below the base model on digits (0.964 vs 0.975)
    d = SIMPLEX_OPTIONS.defaults()
    assert d["epochs"] >= 20 and d["lr"] >= 0.1 and d["samples"] >= 20
