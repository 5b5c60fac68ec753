"""The Hessian probe during training: tr/lambda_max of H and of the GGN, Morse index, stability margin."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradlab.curvature import GGNOperator, dense_hessian
from gradlab.probes import probe_scalars


def tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    g = torch.Generator().manual_seed(0)
    return model, (torch.rand(30, 5, dtype=torch.float64, generator=g), torch.randint(0, 3, (30,), generator=g))


def test_training_scalars_match_dense_references():
    model, batch = tiny()
    H = dense_hessian(model, F.cross_entropy, batch)
    G = GGNOperator(model, None, batch).to_dense()
    ev_h, ev_g = torch.linalg.eigvalsh(H), torch.linalg.eigvalsh(G)
    s = probe_scalars("hessian", model, F.cross_entropy, batch, compare="ggn", density=True, lr=0.5,
                      tol=1e-8, trace_matvecs=66)
    assert s["lambda_max"] == pytest.approx(float(ev_h[-1]), rel=1e-6)
    assert s["lambda_max_ggn"] == pytest.approx(float(ev_g[-1]), rel=1e-6)
    assert s["trace_ggn"] == pytest.approx(float(ev_g.sum()), rel=1e-6)  # xtrace with n products: exact
    assert abs(s["trace"] - float(ev_h.sum())) < 0.05 * abs(float(ev_h.sum()))
    assert s["stability_margin"] == pytest.approx(0.5 * s["lambda_max"] / 2)
    tol = 1e-6 * float(ev_h.abs().max())  # numerically zero eigenvalues count half, as in the probe
    frac = float(((ev_h < -tol).double() + 0.5 * (ev_h.abs() <= tol).double()).mean())
    assert 0 <= s["morse_index"] <= 1 and s["morse_index_stderr"] > 0
    # with as many Lanczos steps as dimensions the quadrature resolves the spectrum: the Morse
    # index is then an unbiased estimate of the dense fraction (fewer steps blur the nodes near 0)
    from gradlab.probes.curvature_train import training_curvature

    full = training_curvature(model, F.cross_entropy, batch, density=True, density_starts=8, density_steps=66)
    assert abs(full["morse_index"] - frac) <= 4 * full["morse_index_stderr"] + 0.02


def test_train_logs_the_curvature_comparison(capsys, tmp_path):
    import pandas as pd
    from clihelp import cli

    r = cli(capsys, "train", "--runs-dir", tmp_path, "--epochs", "1", "--width", "8", "--depth", "1",
            "--opt", "sgd", "--lr", "0.05", "--set", "max_train=128", "--batch-size", "64",
            "--probe", "hessian:every=2:compare=ggn:density=true", "--quiet")
    assert r.code == 0, r.err
    m = pd.read_csv(r.run_path / "metrics.csv")
    rows = m[m["split"] == "curvature"]
    first = rows[rows.step == rows.step.min()].set_index("metric")["value"]
    for key in ("lambda_max", "trace", "lambda_max_ggn", "trace_ggn", "morse_index", "stability_margin"):
        assert key in first.index and first[key] == first[key], key
    assert first["stability_margin"] == pytest.approx(0.05 * first["lambda_max"] / 2, rel=1e-6)
