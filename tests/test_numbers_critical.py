"""One critical-point classifier whose zero tolerance comes from the eigenvalues' error bounds
(issue 14, "Critical points"): probe hessian (Lanczos and dense), classify_function and the
optimizer trajectories all give the same verdict, and an ill-conditioned strict minimum is a minimum."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradlab.landscape import trajectories
from gradlab.landscape.functions import build_function
from gradlab.probes.critical import classify_function, classify_point, dense_eigenvalues, lanczos_errors
from gradlab.probes.hessian import hessian_probe


def rosenbrock(v):
    return (1 - v[0]) ** 2 + 100 * (v[1] - v[0] ** 2) ** 2


def test_rosenbrock_minimum_is_a_strict_minimum():
    c = classify_function(rosenbrock, torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert c.kind == "minimum", c.line()  # eigenvalues 0.3994 and 1001.6: condition number 2508
    assert c.zero_tol < 1e-9  # float64 rounding of a 2x2 matrix, not 1e-3 * lambda_max
    ev, err = dense_eigenvalues(torch.tensor([[802.0, -400.0], [-400.0, 200.0]], dtype=torch.float64))
    assert ev.tolist() == pytest.approx([0.39936077, 1001.60063923], rel=1e-8)
    assert 0 < err < 1e-12


@pytest.mark.parametrize("fn, point", [
    (lambda v: v[0] ** 4, torch.zeros(1)),                          # zero Hessian
    (lambda v: v[0] ** 4 + v[1] ** 2, torch.zeros(2)),              # one flat direction
    (lambda v: (v[0] + v[1]) ** 2, torch.zeros(2)),                 # flat direction off the axes
    (lambda v: v[0] ** 3 - 3 * v[0] * v[1] ** 2, torch.zeros(2)),   # monkey saddle
])
def test_truly_degenerate_points_stay_degenerate(fn, point):
    assert classify_function(fn, point.double()).kind == "degenerate"


def test_signs_are_decided_against_each_eigenvalue_bound():
    # lambda_min = 1e-9 with a bound of 1e-12: positive; the same value with a bound of 1e-8: zero
    assert classify_point(0.0, [1e3], [1e-9], top_errors=[1e-12], bottom_errors=[1e-12]).kind == "minimum"
    assert classify_point(0.0, [1e3], [1e-9], top_errors=[1e-12], bottom_errors=[1e-8]).kind == "degenerate"
    assert classify_point(0.0, [1e3], [-1e-9], top_errors=[1e-12], bottom_errors=[1e-12]).kind == "saddle"
    errs = lanczos_errors(torch.tensor([2.0, -1.0]), torch.tensor([1e-6, float("nan")]), 10, torch.float32, tol=1e-3)
    floor = (10 * torch.finfo(torch.float64).eps + 10 ** 0.5 * torch.finfo(torch.float32).eps) * 2.0
    assert errs == pytest.approx([1e-6 + floor, 1e-3 + floor])  # NaN residual: ARPACK's rule tol*|theta|


@pytest.mark.parametrize("name, point", [
    ("rosenbrock", (1.0, 1.0)), ("saddle", (0.0, 0.0)), ("monkey-saddle", (0.0, 0.0)),
    ("quadratic", (0.0, 0.0)), ("beale", (3.0, 0.5)),
])
def test_trajectories_and_the_probe_classifier_agree(name, point):
    fn = build_function(name)
    kind, eig = trajectories.classify_point(fn, point, grad_norm=0.0)
    ref = classify_function(lambda q: fn.value(q[0], q[1]), torch.tensor(point, dtype=torch.float64), grad_tol=1.0)
    assert kind == ref.kind
    assert {"rosenbrock": "minimum", "beale": "minimum", "quadratic": "minimum", "saddle": "saddle",
            "monkey-saddle": "degenerate"}[name] == kind


def least_squares_model(scales, dtype=torch.float64, duplicate=False):
    """``nn.Linear`` at the exact least-squares solution of features scaled by ``scales``:
    Hessian of the mean squared error = 2 X^T X / N, eigenvalues ~ 2 * scales^2 (condition number
    ``(max/min scale)^2``); ``duplicate`` repeats the first feature (an exactly flat direction)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, len(scales), generator=g, dtype=torch.float64) * torch.tensor(scales, dtype=torch.float64)
    if duplicate:
        x = torch.cat([x, x[:, :1]], 1)
    q, r = torch.linalg.qr(x)
    x = q * torch.linalg.svdvals(r) if not duplicate else x  # orthogonal columns: eigenvalues = 2 s^2 / N
    y = torch.randn(200, generator=g, dtype=torch.float64)
    # SVD-based least squares: the default driver (gelsy) gave a non-minimiser in one of three runs
    # on the rank-deficient (duplicated) design
    w = (torch.linalg.pinv(x) @ y.unsqueeze(1)).T
    model = nn.Linear(x.shape[1], 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w)
    return model.to(dtype), (x.to(dtype), y.to(dtype))


def mse(out, t):
    return ((out.squeeze(-1) - t) ** 2).mean()


@pytest.mark.parametrize("exact", [False, True])
def test_probe_calls_an_ill_conditioned_minimum_a_minimum(exact):
    model, batch = least_squares_model([1.0, 0.3, 0.1, 0.03, 0.003])  # condition number ~1.1e5
    rep = hessian_probe(model, batch, top_k=1, bottom_k=1, trace=False, loss_fn=mse, tol=1e-6, exact=exact)
    assert rep.grad_norm < 1e-10
    assert rep.top[0] / rep.bottom[0] > 1e4  # the old 1e-3 ratio rule called this 'degenerate'
    assert rep.classification.kind == "minimum", rep.classification.line()


@pytest.mark.parametrize("exact", [False, True])
def test_probe_calls_a_flat_direction_degenerate(exact):
    model, batch = least_squares_model([1.0, 0.5, 0.2], duplicate=True)
    rep = hessian_probe(model, batch, top_k=1, bottom_k=1, trace=False, loss_fn=mse, tol=1e-6, exact=exact)
    assert rep.grad_norm < 1e-10
    assert rep.classification.kind == "degenerate", rep.classification.line()


def test_float32_bounds_are_wider_than_float64_ones():
    model64, batch64 = least_squares_model([1.0, 0.1, 0.01])
    model32, batch32 = least_squares_model([1.0, 0.1, 0.01], dtype=torch.float32)
    r64 = hessian_probe(model64, batch64, top_k=1, bottom_k=1, trace=False, loss_fn=mse, exact=True)
    r32 = hessian_probe(model32, batch32, top_k=1, bottom_k=1, trace=False, loss_fn=mse, exact=True)
    assert r32.classification.zero_tol > 1e6 * r64.classification.zero_tol
    assert r32.classification.kind == r64.classification.kind == "minimum"


class _Point(nn.Module):
    """A 2-D point as a model: its output is the point itself, whatever the input."""

    def __init__(self, xy):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(xy, dtype=torch.float64))

    def forward(self, x):
        return self.p.expand(x.shape[0], 2)


@pytest.mark.parametrize("name, point", [("rosenbrock", (1.0, 1.0)), ("saddle", (0.0, 0.0)),
                                         ("monkey-saddle", (0.0, 0.0))])
@pytest.mark.parametrize("exact", [False, True])
def test_probe_hessian_and_trajectories_agree_on_the_same_point(name, point, exact):
    fn = build_function(name)
    kind, _ = trajectories.classify_point(fn, point, grad_norm=0.0)
    batch = (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1))
    rep = hessian_probe(_Point(point), batch, top_k=1, bottom_k=1, trace=False, exact=exact, tol=1e-8,
                        loss_fn=lambda out, _t: fn.value(out[0, 0], out[0, 1]))
    assert rep.classification.kind == kind
