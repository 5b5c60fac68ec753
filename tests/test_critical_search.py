"""Critical points by Newton on the gradient, their Morse index (gradlab.probes.critical_search),
the probe and experiments/critical_points.yaml."""

from __future__ import annotations

import runpy
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from scipy.optimize import fsolve
from torch import nn

from clihelp import cli
from gradlab.core.errors import GradlabError
from gradlab.landscape.functions import build_function
from gradlab.probes.critical_search import flat_problem, morse_index, newton_on_gradient

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("start, index", [((-0.2, -1.9), 0.5), ((3.3, 0.2), 0.5), ((-0.3, -0.9), 1.0),
                                          ((2.8, 2.2), 0.0)])
def test_newton_on_the_gradient_finds_himmelblau_critical_points_of_every_index(start, index):
    fn = build_function("himmelblau")
    loss = lambda p: fn.value(p[0], p[1])  # noqa: E731
    theta, gn, _, ok = newton_on_gradient(loss, torch.tensor(start, dtype=torch.float64), grad_tol=1e-10)
    ref = fsolve(lambda p: fn.gradient(*p).numpy(), start, fprime=lambda p: fn.hessian(*p).numpy(), xtol=1e-13)
    assert ok and gn <= 1e-10 and torch.allclose(theta, torch.tensor(ref), atol=1e-9)
    assert morse_index(fn.hessian(*theta.tolist()))["morse_index"] == index


def test_morse_index_counts_signs_beyond_the_tolerance():
    out = morse_index(torch.diag(torch.tensor([-2.0, -1e-9, 0.0, 3.0, 5.0], dtype=torch.float64)), eig_tol=1e-6)
    assert (out["n_negative"], out["n_zero"], out["n_positive"]) == (1, 2, 2) and out["morse_index"] == 0.2
    assert morse_index(torch.diag(torch.tensor([-2.0, -1e-9, 3.0], dtype=torch.float64)), eig_tol=0)["n_negative"] == 2


def test_flat_problem_is_the_models_loss_and_its_hessian_matches_finite_differences():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 3))
    x, y = torch.randn(10, 3), torch.randint(0, 3, (10,))
    theta, loss = flat_problem(model, F.cross_entropy, [(x[:6], y[:6]), (x[6:], y[6:])])
    assert theta.dtype == torch.float64 and theta.numel() == 17
    assert float(loss(theta)) == pytest.approx(float(F.cross_entropy(model.double()(x.double()), y)), rel=1e-12)
    H = torch.func.hessian(loss)(theta)
    g = torch.func.grad(loss)
    h = 1e-5
    fd = torch.stack([(g(theta + h * e) - g(theta - h * e)) / (2 * h) for e in torch.eye(17, dtype=torch.float64)])
    assert torch.allclose(H, fd, atol=1e-7)


def test_probe_on_a_tiny_network():
    from gradlab.probes import run_probe

    rep = run_probe("critical-points", model="mlp", dataset="digits", width=2, depth=1, act="tanh", batch_size=24,
                    starts=3, train_steps=20, iters=25, grad_tol=1e-4)
    t = rep.table
    assert len(t) == 3 and list(t["gd_step"]) == [0, 5, 20]
    n = int(rep.scalars["n_params"])
    assert n == 64 * 2 + 2 + 2 * 10 + 10
    assert ((t["n_negative"] + t["n_positive"] + t["n_zero"]) == n).all()
    found = t[t["converged"]]
    assert len(found) >= 1 and (found["grad_norm"] <= 1e-4).all() and found["morse_index"].between(0, 1).all()
    assert (t.loc[~t["converged"], "grad_norm"] > 1e-4).all()
    with pytest.raises(GradlabError, match="tiny network"):
        run_probe("critical-points", model="mlp", dataset="digits", width=2, depth=1, max_params=100)


def test_tiny_critical_points_experiment_and_figure(capsys, tmp_path):
    doc = yaml.safe_load((ROOT / "experiments/critical_points.yaml").read_text())
    step = doc["steps"][0]
    assert step["command"] == "probe-critical-points"
    step.update(width=2, batch_size=24, starts=2, train_steps=10, iters=20)
    step["sweep"] = {"seed": [0]}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(doc))
    res = cli(capsys, "run", path, "--runs-dir", tmp_path / "runs", "--yes")
    assert res.code == 0, res.err
    tables = list((tmp_path / "runs").glob("*/critical-points.csv"))
    assert len(tables) == 1 and len(pd.read_csv(tables[0])) == 2
    out = tmp_path / "fig.png"
    runpy.run_path(str(ROOT / "experiments/plot_critical_points.py"))["main"](str(tmp_path / "runs"), str(out))
    assert out.stat().st_size > 1000
