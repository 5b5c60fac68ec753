"""`gradlab connect` and `gradlab simplex` take the run's --loss (cross-entropy or mse); the
divergence floor uses the chance-level loss of the run's loss."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from clihelp import cli
from gradlab.core.losses import chance_loss, mse_one_hot
from gradlab.landscape.connect import evaluate_paths
from gradlab.landscape.directions import weights_of
from gradlab.landscape.simplex import evaluate_simplex
from gradlab.training.callbacks.metrics import DivergenceStop


@pytest.mark.parametrize("c", [2, 10, 100])
def test_chance_loss_is_the_uniform_guess_loss(c):
    y = torch.arange(c)  # balanced
    uniform = torch.full((c, c), 1.0 / c, dtype=torch.float64)
    assert chance_loss("cross-entropy", c) == pytest.approx(float(F.cross_entropy(torch.zeros(c, c), y)))
    assert chance_loss("mse", c) == pytest.approx(float(mse_one_hot(uniform, y)), rel=1e-12)
    # and no constant output does better on balanced classes (the MSE minimiser is the mean target)
    assert float(mse_one_hot(uniform + 0.01 * torch.randn(c, dtype=torch.float64), y)) > chance_loss("mse", c)


def test_divergence_floor_uses_the_runs_loss():
    for loss, floor in (("mse", 0.9), ("cross-entropy", math.log(10)), (None, math.log(10))):
        stop = DivergenceStop(factor=1e3, loss=loss)
        stop.ref_sum, stop.ref_count = 0.001, 1  # a run that starts near zero loss
        assert stop.bound(10) == pytest.approx(1e3 * floor)
    stop = DivergenceStop(factor=1e3, loss="mse")
    stop.ref_sum, stop.ref_count = 5.0, 2
    assert stop.bound(10) == pytest.approx(2500.0)  # above the floor: the first epoch's mean


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(24, 4, dtype=torch.float64), torch.randint(0, 3, (24,))
    return model, x, y


def test_connect_paths_evaluate_the_given_loss():
    model, x, y = _tiny()
    wa = {n: p.detach().clone() for n, p in weights_of(model).items()}
    wb = {n: p + 0.3 * torch.randn_like(p) for n, p in wa.items()}
    bend = {n: 0.5 * (wa[n] + wb[n]) for n in wa}
    table, _ = evaluate_paths(model, wa, wb, bend, [(x, y)], [(x, y)], points=3, loss_fn=mse_one_hot)
    with torch.no_grad():
        ref0 = float(mse_one_hot(torch.func.functional_call(model, wa, (x,)), y))
        ref1 = float(mse_one_hot(torch.func.functional_call(model, wb, (x,)), y))
    assert table["loss"].iloc[0] == pytest.approx(ref0, rel=1e-12)
    assert table["line_loss"].iloc[-1] == pytest.approx(ref1, rel=1e-12)


@pytest.mark.parametrize("loss", ["mse", "cross-entropy"])
def test_simplex_ensemble_of_one_sample_is_that_sample(loss):
    # MSE ensembles average outputs (not softmaxes): the ensemble of one point has that point's loss
    model, x, y = _tiny()
    v0 = {n: p.detach().clone() for n, p in weights_of(model).items()}
    verts = [v0] + [{n: p + 0.2 * torch.randn_like(p) for n, p in v0.items()} for _ in range(2)]
    table, metrics = evaluate_simplex(model, verts, [(x, y)], [(x, y)], samples=1, loss=loss)
    sample = table[table["kind"] == "sample"]["loss"].iloc[0]
    assert metrics["ensemble_loss"] == pytest.approx(sample, rel=1e-9)
    with torch.no_grad():
        out = torch.func.functional_call(model, v0, (x,))
    ref = mse_one_hot(out, y) if loss == "mse" else F.cross_entropy(out, y)
    assert table["loss"].iloc[0] == pytest.approx(float(ref), rel=1e-12)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny MSE-trained MLPs and one cross-entropy one (200 digits, 1 epoch)."""
    from gradlab_cli.main import main

    root = tmp_path_factory.mktemp("runs")
    for name, seed, loss in (("m0", 0, "mse"), ("m1", 1, "mse"), ("c0", 0, "cross-entropy")):
        try:
            main(["train", "--runs-dir", str(root), "--model", "mlp", "--width", "8", "--epochs", "1", "--loss", loss,
                  "--seed", str(seed), "--name", name, "--set", "max_train=200", "--quiet"])
        except SystemExit as e:
            assert e.code in (0, None)
    return root, {p.name.split("-")[-1]: p for p in root.iterdir() if p.is_dir()}


def _test_loss(run) -> float:
    m = pd.read_csv(run / "metrics.csv")
    return float(m[(m.split == "test") & (m.metric == "loss")]["value"].iloc[-1])


def test_connect_and_simplex_use_the_runs_loss(runs, capsys):
    root, by = runs
    m0, m1, c0 = (next(p for k, p in by.items() if k.endswith(n)) for n in ("m0", "m1", "c0"))
    r = cli(capsys, "connect", m0, m1, "--runs-dir", root, "--epochs", 1, "--points", 3, "--quiet")
    assert r.code == 0, r.err
    assert yaml.safe_load((r.run_path / "config.yaml").read_text())["config"]["loss"] == "mse"
    df = pd.read_csv(r.run_path / "connect.csv")
    assert df["loss"].iloc[0] == pytest.approx(_test_loss(m0), rel=1e-6)  # the run's own MSE on the test split
    s = cli(capsys, "simplex", "--runs-dir", root, "--run", m0, "--vertices", 2, "--epochs", 1, "--samples", 2,
            "--quiet")
    assert s.code == 0, s.err
    assert pd.read_csv(s.run_path / "simplex.csv")["loss"].iloc[0] == pytest.approx(_test_loss(m0), rel=1e-6)
    s = cli(capsys, "simplex", "--runs-dir", root, "--run", m0, "--vertices", 2, "--epochs", 1, "--samples", 2,
            "--loss", "cross-entropy", "--quiet")
    assert s.code == 0, s.err
    assert yaml.safe_load((s.run_path / "config.yaml").read_text())["config"]["loss"] == "cross-entropy"
    assert pd.read_csv(s.run_path / "simplex.csv")["loss"].iloc[0] != pytest.approx(_test_loss(m0), rel=1e-3)


def test_connect_runs_of_different_losses_need_loss(runs, capsys):
    root, by = runs
    m0, c0 = (next(p for k, p in by.items() if k.endswith(n)) for n in ("m0", "c0"))
    before = set(root.iterdir())
    for args, words in (([], "--loss"), (["--loss", "hinge"], "cross-entropy, mse")):
        r = cli(capsys, "connect", m0, c0, "--runs-dir", root, *args)
        assert r.code == 2 and words in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert set(root.iterdir()) == before
