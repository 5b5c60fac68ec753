"""2-D test functions: closed-form gradients/Hessians against autograd (float64), and the
trajectory report (convergence, saddle escape, point classification)."""

import math

import pytest
import torch

from gradlab.core.errors import GradlabError
from gradlab.landscape.functions import FUNCTIONS, build_function
from gradlab.landscape.trajectories import classify_point, run_trajectory, summarize

POINTS = [(-1.3, 0.7), (0.4, -2.1), (2.5, 1.2), (0.0, 0.0), (-0.25, 0.9)]


@pytest.mark.parametrize("name", FUNCTIONS.names())
@pytest.mark.parametrize("point", POINTS)
def test_closed_forms_match_autograd(name, point):
    fn = build_function(name, point, cond=4.0 if name == "quadratic" else None)
    p = torch.tensor(point, dtype=torch.float64)
    f = lambda q: fn.value(q[0], q[1])  # noqa: E731
    grad = torch.autograd.functional.jacobian(f, p)
    hess = torch.autograd.functional.hessian(f, p)
    torch.testing.assert_close(fn.gradient(*point), grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fn.hessian(*point), hess, rtol=1e-10, atol=1e-10)
    # the module's forward is the same function of its parameter
    assert float(fn().detach()) == pytest.approx(float(f(p)), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("name", FUNCTIONS.names())
def test_known_minima_are_minima(name):
    fn = build_function(name)
    for m in fn.minima:
        val = float(fn.value(torch.tensor(m[0], dtype=torch.float64), torch.tensor(m[1], dtype=torch.float64)))
        assert val == pytest.approx(fn.f_min, abs=1e-9)
        assert float(fn.gradient(*m).norm()) < 1e-4
        assert classify_point(fn, m, grad_norm=0.0)[0] == "minimum"


def test_wrong_start_dimension_and_bad_options():
    with pytest.raises(GradlabError, match="2"):
        build_function("saddle", (1.0, 2.0, 3.0))
    with pytest.raises(GradlabError, match="quadratic"):
        build_function("saddle", cond=3.0)
    with pytest.raises(GradlabError, match="rosenbrock"):
        build_function("no-such-fn")


def sgd(lr, momentum=0.0):
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum)


def test_sgd_converges_on_quadratic_at_the_predicted_rate():
    fn = build_function("quadratic", (1.0, 1.0), cond=10.0)
    lr = 0.05
    traj = run_trajectory(fn, sgd(lr), 300, name="sgd", lr=lr)
    # GD on diag(1, cond): each coordinate contracts by (1 - lr * h_i) per step, exactly
    x, y = traj.points[-1]
    assert x == pytest.approx((1 - lr) ** 300, rel=1e-9)
    assert y == pytest.approx((1 - 10 * lr) ** 300, abs=1e-12)
    row = summarize(fn, traj, tol=1e-4)
    # loss = x^2/2 at the end; it first goes below 1e-4 once (0.95^t)^2/2 <= 1e-4
    expected = math.ceil(math.log(2e-4) / (2 * math.log(0.95)))
    assert row["steps_to_tol"] in (expected, expected + 1)
    assert row["point_type"] == "minimum"


def test_saddle_escape_detected_and_exact():
    fn = build_function("saddle", (-1.5, 0.01))
    lr = 0.1
    traj = run_trajectory(fn, sgd(lr), 60, name="sgd", lr=lr)
    row = summarize(fn, traj, escape_delta=0.1)
    # GD: x_t = -1.5 * 0.8^t, y_t = 0.01 * 1.2^t; escape = first t with x^2 - y^2 <= -0.1
    t_exp = next(t for t in range(60) if (1.5 * 0.8**t) ** 2 - (0.01 * 1.2**t) ** 2 <= -0.1)
    assert row["escaped"] and row["escape_step"] == t_exp
    d_exp = min(math.hypot(1.5 * 0.8**t, 0.01 * 1.2**t) for t in range(61))
    assert row["min_dist_to_saddle"] == pytest.approx(d_exp, rel=1e-9)
    assert row["steps_to_tol"] is None  # unbounded below: no tolerance target


def test_start_exactly_on_stable_manifold_stays_at_saddle():
    fn = build_function("saddle", (-1.5, 0.0))
    traj = run_trajectory(fn, sgd(0.1), 200, name="sgd", lr=0.1)
    row = summarize(fn, traj)
    assert not row["escaped"] and row["escape_step"] is None
    assert row["point_type"] == "saddle"
    assert row["hess_eig_min"] == pytest.approx(-2.0) and row["hess_eig_max"] == pytest.approx(2.0)


def test_classification_degenerate_and_not_stationary():
    monkey = build_function("monkey-saddle")
    assert classify_point(monkey, (0.0, 0.0))[0] == "degenerate"
    assert classify_point(monkey, (1.0, 0.0), grad_norm=3.0)[0] == "not-critical"  # probe hessian's word
    quad = build_function("quadratic", cond=2.0)
    neg = build_function("saddle")
    assert classify_point(quad, (0.0, 0.0))[0] == "minimum"
    assert classify_point(neg, (0.0, 0.0))[0] == "saddle"


def test_divergence_is_reported_not_raised():
    fn = build_function("quadratic", (1.0, 1.0), cond=10.0)
    traj = run_trajectory(fn, sgd(10.0), 2000, name="sgd", lr=10.0)
    assert traj.diverged
    assert summarize(fn, traj)["point_type"] == "diverged"


def test_closure_optimizer_and_rng_untouched():
    class Newton(torch.optim.Optimizer):
        """Exact Newton step via the closure (loss without backward), the second-order contract."""

        needs_loss_closure = True

        def __init__(self, params, lr=1.0):
            super().__init__(params, {"lr": lr})

        def step(self, closure):
            (p,) = self.param_groups[0]["params"]
            loss = closure()
            g = torch.autograd.grad(loss, p, create_graph=True)[0]
            h = torch.stack([torch.autograd.grad(g[i], p, retain_graph=True)[0] for i in range(2)])
            with torch.no_grad():
                p -= self.param_groups[0]["lr"] * torch.linalg.solve(h, g.detach())
            return loss

    fn = build_function("rosenbrock", (-1.2, 1.0))
    state = torch.get_rng_state()
    traj = run_trajectory(fn, lambda ps: Newton(ps), 30, name="newton", lr=1.0)
    assert torch.equal(state, torch.get_rng_state())
    assert traj.points[-1] == pytest.approx((1.0, 1.0), abs=1e-8)
