"""Issue 18: fp16 loss scaling of the second-order optimizers' gradients and curvature products
(gradlab.optim.loss_scaling). On a purpose-built confident model (class 0 by a logit margin of
20: softmax - onehot ~ 2e-9, below float16's smallest subnormal 6e-8) every gradient and every
Hessian / Gauss-Newton product of the unscaled fp16 backward pass is exactly zero, the float32 ones
are not; loss-scaled, each optimizer's gradient and its curvature product (Hutchinson diagonal,
Newton-CG's Hessian-vector product, the Gauss-Newton product, SR1's and L-BFGS' pairs, SAM's
perturbed gradient, K-FAC's gradient) match float32's to 3% relative error in norm (measured:
under 1%; what is left is the float16 forward pass itself, whose logits at 20 round to 1/64).
Each comparison fails with the scaling off (the quantity is then zero: relative error 1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clihelp import fp16_autocast_on_cpu
from gradlab.core.autocast import with_precision
from gradlab.optim.loss_scaling import attach

pytestmark = pytest.mark.skipif(not fp16_autocast_on_cpu(), reason="this torch has no fp16 autocast on CPU")

RTOL = 0.03
MODES = ("fp32", "fp16", "scaled")  # float32; fp16 autocast unscaled; fp16 autocast loss-scaled


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        net[2].bias[0] += 20.0
    return net


X = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
Y = torch.zeros(16, dtype=torch.long)  # the model's own, confident, prediction


def _setup(mode: str, make):
    """(net, optimizer, closure) for ``mode``; ``make(params)`` builds the optimizer."""
    net = _net()
    model = net if mode == "fp32" else with_precision(net, "fp16")
    opt = make(net.parameters())
    if hasattr(opt, "bind"):
        opt.bind(model, F.cross_entropy)
    if mode == "scaled":
        attach(opt)
    return net, opt, lambda: F.cross_entropy(model(X), Y)


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in ts])


def _check(results: dict) -> None:
    """float32's quantity is non-zero, the unscaled fp16 one exactly zero, the scaled one close."""
    ref, plain, scaled = (results[m] for m in MODES)
    assert ref.abs().max() > 0 and torch.isfinite(scaled).all()
    assert torch.count_nonzero(plain) == 0, "the test model no longer underflows in fp16"
    err = float((scaled - ref).norm() / ref.norm())
    assert err < RTOL, err


def _probes(params):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 2, p.shape, generator=g).float() * 2 - 1 for p in params]


@pytest.mark.parametrize("name", ["adahessian", "curvature-gd"])
def test_hutchinson_gradient_and_diagonal_match_float32(name):
    from gradlab.optim.adahessian import AdaHessian
    from gradlab.optim.curvature_gd import CurvatureGD

    cls = AdaHessian if name == "adahessian" else CurvatureGD
    grads, diags = {}, {}
    for mode in MODES:
        net, opt, closure = _setup(mode, lambda ps: cls(ps, vecs_fn=_probes))
        _, diag = opt._grad_and_diag(closure)
        grads[mode] = _flat(p.grad for p in net.parameters())
        diags[mode] = _flat(diag)
    _check(grads)
    _check(diags)


@pytest.mark.parametrize("name", ["adahessian", "curvature-gd"])
def test_hutchinson_optimizers_step_between_refreshes_with_scaled_gradients(name):
    """hessian_every > 1: the steps between refreshes take a plain (scaled) gradient."""
    from gradlab.optim.adahessian import AdaHessian
    from gradlab.optim.curvature_gd import CurvatureGD

    cls = AdaHessian if name == "adahessian" else CurvatureGD
    grads = {}
    for mode in MODES:
        net, opt, closure = _setup(mode, lambda ps: cls(ps, hessian_every=2, hessian_warmup=0, vecs_fn=_probes))
        opt.steps_taken = 1  # a step between two refreshes
        _, diag = opt._grad_and_diag(closure)
        assert diag is None
        grads[mode] = _flat(p.grad for p in net.parameters())
    _check(grads)


@pytest.mark.parametrize("name", ["newton", "saddle-free-newton"])
def test_newton_gradient_and_hessian_vector_products_match_float32(name):
    """The gradient and the products of the operator Newton-CG and Lanczos run on."""
    from gradlab.optim.closure import evaluate_graph
    from gradlab.optim.newton import Newton, SaddleFreeNewton

    cls = Newton if name == "newton" else SaddleFreeNewton
    grads, hvps = {}, {}
    for mode in MODES:
        net, opt, closure = _setup(mode, cls)
        _, g, op = evaluate_graph(closure, opt._params(), name, opt.loss_scaler)
        grads[mode] = g.double()
        V = torch.randn(op.n, 3, generator=torch.Generator().manual_seed(4))
        hvps[mode] = op.matmat(V).double()
    _check(grads)
    _check(hvps)


def test_a_newton_cg_step_matches_float32():
    from gradlab.optim.newton import Newton

    moves = {}
    for mode in MODES:  # 83 parameters: Newton-CG (exact_max_params=0), fixed damping
        net, opt, closure = _setup(mode, lambda ps: Newton(ps, damping=1e-6, damping_rule="fixed",
                                                           exact_max_params=0, cg_max_iter=5))
        before = _flat(net.parameters())
        opt.step(closure)
        moves[mode] = _flat(net.parameters()) - before
    _check(moves)


def test_natural_gradient_gradient_and_gauss_newton_products_match_float32():
    from gradlab.curvature.ggn import Linearization
    from gradlab.optim.natural_gd import NaturalGD

    grads, products = {}, {}
    for mode in MODES:
        net, opt, closure = _setup(mode, NaturalGD)
        params = opt._params()
        with torch.enable_grad():
            loss, z, _ = opt._forward(closure)
            gs = opt._gradients(loss, params, retain_graph=True)
            lin = Linearization.of_outputs(z, params)
        matvec = opt._curvature_product(lin, z.detach(), 1.0)
        v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(5))
        grads[mode], products[mode] = _flat(gs), matvec(v).double()
    _check(grads)
    _check(products)


def test_kfac_gradient_goes_through_the_shared_scaled_gradient():
    """K-FAC takes its gradient from ModelBoundOptimizer._gradients, which is loss-scaled (its
    factor backward is K-FAC's own)."""
    from gradlab.optim.kfac import KFAC

    grads = {}
    for mode in MODES:
        net, opt, closure = _setup(mode, KFAC)
        with torch.enable_grad():
            grads[mode] = _flat(opt._gradients(closure(), opt._params(), retain_graph=False))
    _check(grads)


def test_sr1_curvature_pair_matches_float32():
    from gradlab.optim.sr1 import SR1

    pairs = {}
    for mode in MODES:
        net, opt, closure = _setup(mode, SR1)
        opt.gamma = 1e-8  # the model Hessian's scale at this curvature: a step of the trust radius
        opt.step(closure)
        pairs[mode] = torch.stack(opt.Y).double() if opt.Y else torch.zeros(1, dtype=torch.float64)
    _check(pairs)


def test_lbfgs_curvature_pair_matches_float32():
    from gradlab.optim.lbfgs import LBFGS

    pairs = {}
    for mode in MODES:  # two iterations of fixed step lr (the loss is 0.0 in float32: no tolerance stop)
        net, opt, closure = _setup(mode, lambda ps: LBFGS(ps, lr=1e8, max_iter=2, line_search=False,
                                                          tolerance_change=0.0))
        opt.step(closure)
        dirs = opt.state[opt._params[0]].get("old_dirs") or [torch.zeros(1)]
        pairs[mode] = torch.stack(dirs).double()
    _check(pairs)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_perturbed_gradient_matches_float32(adaptive):
    from gradlab.optim.sam import SAM

    grads = {}
    for mode in MODES:
        net, opt, closure = _setup(mode, lambda ps: SAM(ps, rho=0.5, adaptive=adaptive))
        opt.step(closure)
        grads[mode] = _flat(p.grad for p in net.parameters())
    _check(grads)


def test_without_a_scaler_the_optimizers_take_plain_gradients():
    """A notebook user's optimizer (nothing attached) under fp32: the plain autograd gradient."""
    from gradlab.optim.adahessian import AdaHessian

    net, opt, closure = _setup("fp32", lambda ps: AdaHessian(ps, vecs_fn=_probes))
    assert opt.loss_scaler is None
    opt._grad_and_diag(closure)
    ref = torch.autograd.grad(closure(), list(net.parameters()))
    assert all(torch.equal(p.grad, r) for p, r in zip(net.parameters(), ref))
