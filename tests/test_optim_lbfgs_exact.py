"""L-BFGS with the exact line search (gradlab.optim.lbfgs_exact): the n-step termination on a
strictly convex quadratic, its iterates equal to scipy's conjugate gradients (the theorem's
reason), the two-loop recursion against the dense BFGS inverse update, the secant search on a
non-quadratic line, and checkpoints carrying the memory. float64 throughout."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from gradlab.landscape.functions import build_function
from gradlab.optim import build_optimizer
from gradlab.optim.lbfgs_exact import exact_search, two_loop

D64 = torch.float64


def quadratic(n, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, dtype=D64, generator=g)
    return a @ a.T + torch.eye(n, dtype=D64), torch.randn(n, dtype=D64, generator=g)


@pytest.mark.parametrize("n", [6, 8, 10])
def test_exact_search_lbfgs_terminates_in_at_most_n_plus_one_iterations(n):
    for seed in range(3):
        A, b = quadratic(n, seed)
        w = torch.zeros(n, dtype=D64, requires_grad=True)
        opt = build_optimizer("lbfgs", [w], exact_line_search=True, history_size=n)
        for k in range(1, n + 2):
            opt.step(lambda: 0.5 * (w - b) @ A @ (w - b))
            if (A @ (w.detach() - b)).norm() < 1e-10:
                break
        assert (A @ (w.detach() - b)).norm() < 1e-10 and k <= n + 1, (n, seed, k)


def test_iterates_are_scipys_conjugate_gradient_iterates():
    from scipy.sparse.linalg import cg

    n = 8
    A, b = quadratic(n, 0)
    ref = []
    cg(A.numpy(), (A @ b).numpy(), x0=np.zeros(n), rtol=1e-14, atol=0, maxiter=n,
       callback=lambda xk: ref.append(xk.copy()))
    w = torch.zeros(n, dtype=D64, requires_grad=True)
    opt = build_optimizer("lbfgs", [w], exact_line_search=True, history_size=n)
    for xk in ref[: n - 1]:
        opt.step(lambda: 0.5 * (w - b) @ A @ (w - b))
        np.testing.assert_allclose(w.detach().numpy(), xk, rtol=1e-9, atol=1e-11)


def test_two_loop_is_the_dense_bfgs_inverse_update():
    n, g = 5, torch.Generator().manual_seed(4)
    S = [torch.randn(n, dtype=D64, generator=g) for _ in range(3)]
    M = torch.randn(n, n, dtype=D64, generator=g)
    M = M @ M.T + n * torch.eye(n, dtype=D64)
    Y = [M @ s for s in S]  # s^T y > 0
    grad = torch.randn(n, dtype=D64, generator=g)
    H = float(S[-1] @ Y[-1]) / float(Y[-1] @ Y[-1]) * torch.eye(n, dtype=D64)
    eye = torch.eye(n, dtype=D64)
    for s, y in zip(S, Y):  # N&W eq. 6.17
        rho = 1 / float(y @ s)
        H = (eye - rho * torch.outer(s, y)) @ H @ (eye - rho * torch.outer(y, s)) + rho * torch.outer(s, s)
    torch.testing.assert_close(two_loop(grad, S, Y), -H @ grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(two_loop(grad, [], []), -grad)


def test_secant_search_finds_the_minimum_along_a_line():
    # phi(t) = exp(t) - 3t (minimum at log 3) and a quadratic (one secant step: two evaluations)
    calls = []
    t, evals = exact_search(lambda t: calls.append(t) or math.exp(t) - 3, 1 - 3, 0.1, 1e-12)
    assert t == pytest.approx(math.log(3), rel=1e-10) and evals <= 25
    t, evals = exact_search(lambda t: 4 * t - 2, -2.0, 5.0, 1e-12)  # phi = 2 t^2 - 2 t
    assert t == pytest.approx(0.5, rel=1e-14) and evals == 2


def test_rosenbrock_converges_and_a_resumed_run_continues_bit_identically():
    def run(resume_at=None, steps=60):
        fn = build_function("rosenbrock")
        opt = build_optimizer("lbfgs", fn.parameters(), exact_line_search=True)
        for k in range(steps):
            if k == resume_at:
                buf = io.BytesIO()
                torch.save((fn.state_dict(), opt.state_dict()), buf)
                buf.seek(0)
                model_sd, opt_sd = torch.load(buf, weights_only=True)
                fn = build_function("rosenbrock", (3.0, 3.0))
                fn.load_state_dict(model_sd)
                opt = build_optimizer("lbfgs", fn.parameters(), exact_line_search=True)
                opt.load_state_dict(opt_sd)
            opt.step(lambda: fn())
        return fn.point.detach()

    straight = run()
    fn = build_function("rosenbrock", tuple(straight.tolist()))
    (grad,) = torch.autograd.grad(fn(), fn.point)
    assert grad.norm() < 1e-8
    assert torch.equal(run(resume_at=7), straight)
