"""Newton and saddle-free Newton's Levenberg-Marquardt damping (gradlab.optim.damping, shared with
natural-gd): the predicted change of the quadratic model against a dense float64 Hessian, the
ratio rule, the undo of a step that raises the loss, checkpoints carrying the adapted damping,
and the 2-D functions keeping the textbook (fixed) steps under the default rule."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradlab.landscape.functions import build_function
from gradlab.optim import build_optimizer

D64 = torch.float64


def tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(D64)  # 38 parameters
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(20, 3, generator=g, dtype=D64), torch.randint(0, 3, (20,), generator=g)


def flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params])


def dense_hessian(model, x, y):
    params = list(model.parameters())
    loss = F.cross_entropy(model(x), y)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params, create_graph=True)])
    rows = [torch.cat([t.reshape(-1) for t in torch.autograd.grad(g[i], params, retain_graph=True)])
            for i in range(g.numel())]
    return float(loss.detach()), g.detach(), torch.stack(rows)


@pytest.mark.parametrize("name,opts", [("newton", {"exact_max_params": 200}),  # dense solve
                                       ("newton", {"exact_max_params": 0, "cg_max_iter": 60}),  # Newton-CG
                                       ("saddle-free-newton", {"krylov_dim": 6})])  # Krylov, k < n
def test_predicted_change_and_ratio_rule_against_a_dense_hessian(name, opts):
    model, x, y = tiny()
    params = list(model.parameters())
    lr = 0.7
    opt = build_optimizer(name, params, lr=lr, damping=0.3, damping_rule="adaptive", **opts)
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    kept = 0
    for _ in range(6):
        lam = opt.param_groups[0]["damping"]
        before = flat(params)
        f0, g, H = dense_hessian(model, x, y)
        opt.step(closure)
        last = opt.last
        if not last["kept"]:
            continue
        s = flat(params) - before  # lr * d
        q = float(g @ s + 0.5 * s @ H @ s)
        assert last["q"] == pytest.approx(q, rel=1e-7, abs=1e-12)
        with torch.no_grad():
            f1 = float(closure())
        assert last["rho"] == pytest.approx((f1 - f0) / q, rel=1e-6)
        rho = last["rho"]
        want = lam * 1.5 if rho < 0.25 else lam * 2 / 3 if rho > 0.75 else lam
        assert opt.param_groups[0]["damping"] == pytest.approx(want, rel=1e-12)
        kept += 1
    assert kept >= 3


def test_a_step_that_raises_the_loss_is_undone_and_the_damping_grows():
    n = 6
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, dtype=D64, generator=g)
    A, b = a @ a.T + torch.eye(n, dtype=D64), torch.randn(n, dtype=D64, generator=g)
    w = torch.zeros(n, dtype=D64, requires_grad=True)
    opt = build_optimizer("newton", [w], lr=3.0, damping=0.0, damping_rule="adaptive")  # 3 x Newton's step
    opt.step(lambda: 0.5 * (w - b) @ A @ (w - b))
    assert torch.equal(w.detach(), torch.zeros(n, dtype=D64))  # f(3 d) > f(0) on a quadratic: undone
    assert not opt.last["kept"] and opt.last["rho"] < 0
    assert opt.param_groups[0]["damping"] == pytest.approx(1e-8)  # 0 * 3/2, floored so it can grow
    opt.param_groups[0]["lr"] = 1.0
    opt.step(lambda: 0.5 * (w - b) @ A @ (w - b))  # the Newton step: rho = 1, the damping shrinks
    assert opt.last["rho"] == pytest.approx(1.0, rel=1e-6)
    torch.testing.assert_close(w.detach(), b, rtol=1e-6, atol=1e-7)


def test_checkpoints_carry_the_adapted_damping():
    model, x, y = tiny()
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    opt = build_optimizer("newton", model.parameters(), lr=1.0, damping=1e-4, exact_max_params=0)
    for _ in range(4):
        opt.step(closure)
    adapted = opt.param_groups[0]["damping"]
    assert adapted != 1e-4
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    other = build_optimizer("newton", model.parameters(), lr=1.0, damping=0.5, exact_max_params=0)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.param_groups[0]["damping"] == adapted and other.steps_taken == 4


@pytest.mark.parametrize("name", ["newton", "saddle-free-newton"])
@pytest.mark.parametrize("fn", ["rosenbrock", "saddle", "himmelblau"])
def test_the_default_rule_keeps_the_textbook_steps_on_2d_functions(name, fn):
    paths = []
    for rule in ("auto", "fixed"):
        f = build_function(fn)
        opt = build_optimizer(name, f.parameters(), damping_rule=rule)
        for _ in range(15):
            opt.step(lambda: f())
        paths.append(f.point.detach().clone())
    assert torch.equal(paths[0], paths[1])


def test_auto_adapts_above_the_exact_size():
    model, x, y = tiny()  # 38 parameters
    for name, opts, adapts in (("newton", {"exact_max_params": 37}, True), ("newton", {}, False),
                               ("saddle-free-newton", {"krylov_dim": 38}, False),
                               ("saddle-free-newton", {"krylov_dim": 37}, True)):
        opt = build_optimizer(name, model.parameters(), **opts)
        opt.step(lambda: F.cross_entropy(model(x), y))
        assert bool(opt.last) == adapts, (name, opts)
