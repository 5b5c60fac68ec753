"""The gradnorm verdict states its evidence and says 'inconclusive' when the fit cannot carry it
(issue 14, "Everyday feedback": a fit on three points, or a low R^2)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradlab.models.base import GradlabNet, Normalize
from gradlab.probes.gradnorm import MIN_R2, fit_signal, gradnorm_probe, verdict_from_fit, verdict_line


def sigmoid_mlp(depth, width=16, d_in=6, n_out=3):
    torch.manual_seed(0)
    blocks, prev = [], d_in
    for _ in range(depth):
        blocks.append(nn.Sequential(nn.Linear(prev, width), nn.Sigmoid()))
        prev = width
    return GradlabNet(Normalize([0.5], [0.25]), blocks, nn.Linear(prev, n_out)).double()


def batch(n=16, d_in=6, n_out=3):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, d_in, generator=g, dtype=torch.float64), torch.randint(0, n_out, (n,), generator=g)


def test_fit_on_three_layers_is_inconclusive():
    rep = gradnorm_probe(sigmoid_mlp(2), nn.CrossEntropyLoss(), [batch()])  # blocks.0, blocks.1, head
    assert len(rep.layers) == 3 and rep.fit.n_layers == 3
    assert rep.rate < 1 / 1.1  # the rate alone would say 'vanishing'
    assert rep.verdict == "inconclusive"
    line = verdict_line(rep)
    assert line.startswith("verdict: inconclusive") and "over 3 layers" in line and "R^2 = " in line
    assert rep.metrics()["fit_layers"] == 3


def test_deep_fit_states_its_evidence():
    rep = gradnorm_probe(sigmoid_mlp(12), nn.CrossEntropyLoss(), [batch()])
    assert rep.verdict == "vanishing"
    fit = rep.fit
    assert fit.n_layers == 13 and fit.r2 > 0.9
    m = rep.metrics()
    assert m["fit_layers"] == 13 and m["fit_r2"] == pytest.approx(fit.r2)
    assert f"over 13 layers, R^2 = {fit.r2:.3f}" in verdict_line(rep)


def test_r2_and_stderr_match_a_hand_fit():
    depths = [0, 1, 2, 3, 4, 5]
    logs = torch.tensor([0.0, -1.2, -1.8, -3.3, -3.9, -5.1], dtype=torch.float64)
    fit = fit_signal(depths, torch.exp(logs).tolist())
    d = torch.tensor(depths, dtype=torch.float64)
    A = torch.stack([torch.ones_like(d), d], 1)
    coef = torch.linalg.lstsq(A, logs.unsqueeze(1)).solution.squeeze(1)
    resid = logs - A @ coef
    r2 = 1 - float(resid @ resid) / float(((logs - logs.mean()) ** 2).sum())
    se = math.sqrt(float(resid @ resid) / 4 / float(((d - d.mean()) ** 2).sum()))
    assert fit.log_rate == pytest.approx(-float(coef[1]), rel=1e-12)
    assert fit.r2 == pytest.approx(r2, rel=1e-12) and fit.slope_stderr == pytest.approx(se, rel=1e-12)
    assert verdict_from_fit(fit, 0.1) == "exploding"  # larger towards the input (depth 0)


def test_low_r2_trend_and_loose_stable_are_inconclusive():
    # a zigzag that drifts down with depth: the rate says 'exploding', the fit explains little
    zigzag = [1.0, 0.2, 0.9, 0.15, 0.8, 0.12, 0.7, 0.1]
    fit = fit_signal(range(8), zigzag)
    assert fit.r2 < MIN_R2 and math.exp(fit.log_rate) > 1.1
    assert verdict_from_fit(fit, 0.1) == "inconclusive"
    # a flat trend with large scatter: the slope is not pinned inside the +-10% band
    noisy = [1.0, 2.0, 0.5, 1.8, 0.6, 1.9, 0.55, 1.0]
    fit = fit_signal(range(8), noisy)
    assert abs(fit.log_rate) < math.log(1.1)
    assert verdict_from_fit(fit, 0.1) == "inconclusive"
    # an exactly flat line is a conclusive 'stable'
    assert verdict_from_fit(fit_signal(range(5), [3.0] * 5), 0.1) == "stable"
