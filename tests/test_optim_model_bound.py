"""natural-gd and kfac (the optimizers bound to the model), against dense float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradlab.core.errors import GradlabError
from gradlab.curvature import GGNOperator, KFACOperator
from gradlab.curvature.cg import conjugate_gradient
from gradlab.optim import build_optimizer


def flat(ts):
    return torch.cat([t.detach().reshape(-1) for t in ts])


def grad_of(loss_fn, params):
    return flat(torch.autograd.grad(loss_fn(), params))


# -- conjugate gradient ---------------------------------------------------------------------------

def test_cg_solves_an_spd_system_in_n_iterations_and_from_a_warm_start():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(12, 12, generator=g, dtype=torch.float64)
    A, b = M @ M.T + 0.1 * torch.eye(12, dtype=torch.float64), torch.randn(12, generator=g, dtype=torch.float64)
    want = torch.linalg.solve(A, b)
    res = conjugate_gradient(lambda v: A @ v, b, max_iters=12, rtol=1e-12, progress_eps=0)
    assert res.iterations <= 12 and torch.allclose(res.x, want, atol=1e-8)
    assert torch.allclose(res.residual, b - A @ res.x, atol=1e-10)
    warm = conjugate_gradient(lambda v: A @ v, b, want + 1e-9, max_iters=12, rtol=1e-6)
    assert warm.iterations <= 1 and torch.allclose(warm.x, want, atol=1e-7)


# -- natural-gd -----------------------------------------------------------------------------------

def _linear_mse(seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
    return model, x, y


def test_natural_gd_on_a_linear_model_with_mse_is_the_damped_newton_step():
    model, x, y = _linear_mse()
    params = list(model.parameters())
    loss = lambda: F.mse_loss(model(x), y)  # noqa: E731
    theta = flat(params)
    g = grad_of(loss, params)

    def f(v):
        w, b = v[:6].view(2, 3), v[6:]
        return F.mse_loss(x @ w.T + b, y)
    H = torch.autograd.functional.hessian(f, theta)  # the exact Hessian: G = H for a linear model
    lam = 1e-3
    newton = -torch.linalg.solve(H + lam * torch.eye(8, dtype=torch.float64), g)
    opt = build_optimizer("natural-gd", params, lr=1.0, damping=lam, adapt_damping=False, cg_iters=8)
    opt.bind(model, F.mse_loss)
    opt.step(loss)
    assert torch.allclose(flat(params) - theta, newton, atol=1e-9, rtol=1e-7)
    assert opt.param_groups[0]["damping"] == lam  # not adapted
    # a second step from the new point: the quadratic's minimiser (damped) is reached again
    g2 = grad_of(loss, params)
    assert g2.norm() < 1e-2 * g.norm()


def test_natural_gd_reduction_ratio_and_levenberg_marquardt_rule():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    params = list(model.parameters())
    opt = build_optimizer("natural-gd", params, lr=1.0, damping=0.05, cg_iters=30)
    opt.bind(model, F.cross_entropy)
    loss = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    seen = set()
    for _ in range(8):
        lam = opt.param_groups[0]["damping"]
        before, f0 = flat(params), float(loss())
        g = grad_of(loss, params)
        G = GGNOperator(model, F.cross_entropy, (x, y), mode="train").to_dense()
        opt.step(loss)
        d = torch.cat([opt.state[p]["direction"].reshape(-1) for p in params])
        q = float(g @ d + 0.5 * d @ G @ d)
        with torch.no_grad():
            torch._foreach_copy_(params, [t.view_as(p) for t, p in zip(torch.split(before + d, [p.numel() for p in params]), params)])
            f1 = float(loss())
            moved = flat(params)
        rho = (f1 - f0) / q
        assert opt.last["rho"] == pytest.approx(rho, rel=1e-6, abs=1e-9)
        want = lam * 1.5 if rho < 0.25 else lam * 2 / 3 if rho > 0.75 else lam
        assert opt.param_groups[0]["damping"] == pytest.approx(want, rel=1e-12)
        seen.add("boost" if rho < 0.25 else "drop" if rho > 0.75 else "keep")
        if f1 > f0:  # the step is undone
            moved = before
        with torch.no_grad():
            torch._foreach_copy_(params, [t.view_as(p) for t, p in zip(torch.split(moved, [p.numel() for p in params]), params)])
    assert "drop" in seen


def test_natural_gd_undoes_a_step_that_raises_the_loss_and_boosts_the_damping():
    model, x, y = _linear_mse()
    params = list(model.parameters())
    theta = flat(params)
    opt = build_optimizer("natural-gd", params, lr=3.0, damping=1e-6, cg_iters=8)  # 3 x the Newton step
    opt.bind(model, F.mse_loss)
    opt.step(lambda: F.mse_loss(model(x), y))
    assert torch.equal(flat(params), theta)
    assert opt.param_groups[0]["damping"] == pytest.approx(1.5e-6)


def test_natural_gd_fisher_trains_and_an_unbound_model_bound_optimizer_says_why():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    opt = build_optimizer("natural-gd", model.parameters(), curvature="fisher", mc_samples=4, damping=0.1)
    with pytest.raises(GradlabError, match="needs the model and its loss: call opt.bind"):
        opt.step(lambda: F.cross_entropy(model(x), y))
    opt.bind(model, F.cross_entropy)
    first = float(opt.step(lambda: F.cross_entropy(model(x), y)))
    for _ in range(6):
        last = float(opt.step(lambda: F.cross_entropy(model(x), y)))
    assert last < 0.8 * first
    with pytest.raises(GradlabError, match="log-likelihood"):
        build_optimizer("kfac", model.parameters()).bind(model, F.l1_loss)


# -- kfac -----------------------------------------------------------------------------------------

def _tiny_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _kron_block(G, A):
    """kron(G, A) in the flat layout of (W, b): W row-major first, then the bias."""
    o, k1 = G.shape[0], A.shape[0]
    perm = [r * k1 + c for r in range(o) for c in range(k1 - 1)] + [r * k1 + k1 - 1 for r in range(o)]
    return torch.kron(G.contiguous(), A.contiguous())[perm][:, perm]  # kron of a transposed view fails


def test_kfac_step_equals_the_dense_kronecker_formula_built_by_hand():
    model = _tiny_mlp()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randint(0, 2, (7,))
    (W1, b1), (W2, b2) = (model[0].weight, model[0].bias), (model[2].weight, model[2].bias)
    with torch.no_grad():  # the factors by hand (type-2: the exact output Hessian)
        s1 = x @ W1.T + b1
        a2 = torch.tanh(s1)
        z = a2 @ W2.T + b2
        p = z.softmax(1)
        lam_out = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / len(x)  # (N, C, C), mean loss
        J1 = W2[None] * (1 - a2 ** 2)[:, None, :]  # dz/ds1 (N, C, 4)
        G1 = torch.einsum("nca,ncd,ndb->ab", J1, lam_out, J1)
        G2 = lam_out.sum(0)
        bar = lambda a: torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)  # noqa: E731
        A1, A2 = bar(x).T @ bar(x) / len(x), bar(a2).T @ bar(a2) / len(x)
    K = torch.block_diag(_kron_block(G1, A1), _kron_block(G2, A2))
    params = list(model.parameters())
    loss = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    g, theta, lam = grad_of(loss, params), flat(params), 0.03
    want = -torch.linalg.solve(K + lam * torch.eye(len(g), dtype=torch.float64), g)
    opt = build_optimizer("kfac", params, lr=1.0, momentum=0.0, damping=lam, kl_clip=0.0, fisher_type="type-2")
    opt.bind(model, F.cross_entropy)
    opt.step(loss)
    assert torch.allclose(flat(params) - theta, want, atol=1e-10, rtol=1e-8)


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4)).double()


def test_kfac_factors_ema_and_inverse_schedule_follow_the_curvature_engine_on_a_cnn():
    model = _cnn()
    batches = [(torch.randn(6, 1, 5, 5, dtype=torch.float64), torch.randint(0, 4, (6,))) for _ in range(3)]
    opt = build_optimizer("kfac", model.parameters(), factor_every=1, inverse_every=2, factor_decay=0.9,
                          fisher_type="type-2", lr=0.1)
    opt.bind(model, F.cross_entropy)
    want = None
    for u, (x, y) in enumerate(batches, start=1):
        ref = KFACOperator(model, F.cross_entropy, (x, y), fisher_type="type-2", mode="train")
        e = min(1 - 1 / u, 0.9)
        new = [(blk.A.clone(), blk.G.clone()) for blk in ref.blocks]
        want = new if want is None else [(e * a + (1 - e) * na, e * g + (1 - e) * ng)
                                         for (a, g), (na, ng) in zip(want, new)]
        opt.step(lambda: F.cross_entropy(model(x), y))
        for blk, (a, g) in zip(opt.blocks, want):
            assert torch.allclose(blk.A, a, atol=1e-12) and torch.allclose(blk.G, g, atol=1e-12)
        if u == 2:  # the inverse was refreshed at step 1 (u = 1), not at step 2
            assert not torch.allclose(opt.blocks[0]._eig[0], torch.linalg.eigvalsh(opt.blocks[0].A).clamp_min(0))
    # refreshed at step 3 (t = 2)
    assert torch.allclose(opt.blocks[0]._eig[0], torch.linalg.eigvalsh(opt.blocks[0].A).clamp_min(0), atol=1e-12)


def test_kfac_factored_damping_is_the_dense_kronecker_inverse_of_the_damped_factors():
    """damping_mode="factored" (Martens & Grosse 2015, Sec. 6.3): the step is
    -(G + sqrt(l)/pi I)^-1 (x) (A + pi sqrt(l) I)^-1 applied to the gradient, pi from the traces,
    checked against a dense solve built from the optimizer's factors, on a conv + linear model."""
    model = _cnn()
    x, y = torch.randn(6, 1, 5, 5, dtype=torch.float64), torch.randint(0, 4, (6,))
    params = list(model.parameters())
    loss = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    g, theta, lam = grad_of(loss, params), flat(params), 0.05
    opt = build_optimizer("kfac", params, lr=1.0, momentum=0.0, damping=lam, kl_clip=0.0, fisher_type="type-2",
                          damping_mode="factored")
    opt.bind(model, F.cross_entropy)
    opt.step(loss)
    blocks = []
    for blk in opt.blocks:
        A, G = blk.A, blk.G
        pi = ((torch.trace(A) / len(A)) / (torch.trace(G) / len(G))).sqrt()
        blocks.append(_kron_block(G + lam ** 0.5 / pi * torch.eye(len(G), dtype=G.dtype),
                                  A + pi * lam ** 0.5 * torch.eye(len(A), dtype=A.dtype)))
    assert len(blocks) == 2  # the conv (weight (3, 1, 3, 3) flat row-major as (O, K), then bias) and the head
    want = -torch.linalg.solve(torch.block_diag(*blocks), g)
    assert torch.allclose(flat(params) - theta, want, atol=1e-10, rtol=1e-8)
    assert all(blk._eig is None for blk in opt.blocks)  # no eigendecomposition in this mode


def test_kfac_leaves_unsupported_layers_on_plain_sgd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    opt = build_optimizer("kfac", model.parameters(), lr=0.1, momentum=0.0, kl_clip=0.0)
    opt.bind(model, F.cross_entropy)
    assert opt.plain_params == ["1.weight", "1.bias"]
    bn = [model[1].weight, model[1].bias]
    before = [p.detach().clone() for p in bn]
    with torch.no_grad():
        model.train()
    opt.step(lambda: F.cross_entropy(model(x), y))
    for p, b in zip(bn, before):
        assert torch.allclose(p.detach(), b - 0.1 * p.grad, atol=1e-14)


@pytest.mark.parametrize("mode", ["exact", "factored"])
def test_kfac_resumes_from_its_state_dict_with_the_same_steps(mode):
    """Factors, eigenbases or factored inverses (refreshed on another schedule than the factors) and
    momentum travel in state_dict: a fresh optimizer loaded mid-run takes the same next steps."""
    import copy

    x, y = torch.randn(6, 1, 5, 5, dtype=torch.float64), torch.randint(0, 4, (6,))
    runs = []
    for resume in (False, True):
        model = _cnn()
        make = lambda: build_optimizer("kfac", model.parameters(), factor_every=2, inverse_every=3,  # noqa: E731
                                       damping_mode=mode, fisher_type="type-2", lr=0.1)
        opt = make()
        opt.bind(model, F.cross_entropy)
        for t in range(7):
            if resume and t == 5:  # factors updated at t = 4, inverses last at t = 3: both must travel
                state = copy.deepcopy(opt.state_dict())
                opt = make()
                opt.load_state_dict(state)
                opt.bind(model, F.cross_entropy)
            opt.step(lambda: F.cross_entropy(model(x), y))
        runs.append(flat(list(model.parameters())))
    assert torch.equal(runs[0], runs[1])
