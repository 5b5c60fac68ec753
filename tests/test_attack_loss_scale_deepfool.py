"""fp16 DeepFool and curvature attack: DeepFool's batched Jacobian rows (one is_grads_batched
backward pass) and the curvature attack's gradient and HVPs (double backward) go through the
dynamic loss scaling of gradlab.attacks.loss_scale; where the unscaled fp16 products underflow to
zero, the scaled ones match float32's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradlab.attacks import build_attack
from clihelp import fp16_autocast_on_cpu
from gradlab.attacks.loss_scale import InputGradScaler
from gradlab.core.autocast import with_precision


pytestmark = pytest.mark.skipif(not fp16_autocast_on_cpu(), reason="this torch has no fp16 autocast on CPU")


def _tiny_gradient_model():
    """Logits whose input gradients are ~1e-9 (below fp16's smallest subnormal, 6e-8); the
    logits themselves (~1e-3 plus a bias) are representable."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        net[1].weight.mul_(1e-4)
        net[1].bias.fill_(0.5)
        net[3].weight.mul_(1e-4)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval(), torch.rand(6, 1, 4, 4)


def _cos(a, b):
    a, b = a.double().flatten(1), b.double().flatten(1)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def test_batched_scaled_grad_matches_float32_where_plain_fp16_underflows():
    net, x = _tiny_gradient_model()
    basis = torch.eye(4)[:, None, :].expand(4, x.shape[0], 4)

    def rows(model, scaler=None):
        xr = x.clone().requires_grad_(True)
        z = model(xr)
        if scaler is not None:
            return scaler.grad(z, xr, basis)
        return torch.autograd.grad(z, xr, grad_outputs=basis, is_grads_batched=True)[0]

    ref = rows(net)
    assert 0 < ref.abs().max() < 1e-7
    half = with_precision(net, "fp16")
    assert torch.count_nonzero(rows(half)) == 0  # underflowed
    scaled = rows(half, InputGradScaler())
    assert scaled.shape == ref.shape and scaled.dtype == torch.float32
    assert torch.all(_cos(scaled.reshape(-1, 16), ref.reshape(-1, 16)) > 0.99)


def test_fp16_deepfool_jacobian_rows_are_loss_scaled():
    net, x = _tiny_gradient_model()
    y = net(x).argmax(1)
    cand = torch.tensor([[c for c in range(4) if c != int(t)] for t in y])

    def jac(precision):
        attack = build_attack("deepfool", net, 1.0, precision=precision)
        with attack.session(x, y) as (x0, y0), torch.enable_grad():
            return attack.jacobian_rows(x0, y0, cand)[1]

    ref, half = jac("fp32"), jac("fp16")
    assert 0 < ref.abs().max() < 1e-7
    assert half.abs().max() > 0  # without scaling every row is zero (first test)
    assert torch.all(_cos(half.reshape(-1, 16), ref.reshape(-1, 16)) > 0.99)


def test_fp16_curvature_hvps_are_loss_scaled():
    """The curvature attack's input-Hessian eigenpairs under fp16: on a confident model (class 0
    by a logit margin of ~16) the gradient and every HVP underflow to zero unscaled; scaled, the
    top eigenpair matches float32's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():
        net[3].weight.mul_(0.1)
        net[3].bias[0] += 16.0
    for p in net.parameters():
        p.requires_grad_(False)
    net.eval()
    x, y = torch.rand(8, 1, 4, 4), torch.zeros(8, dtype=torch.long)

    def top(precision):
        return build_attack("curvature", net, 0.1, precision=precision, lanczos_iters=12, seed=0).top_eigenpairs(x, y)

    lam32, v32 = top("fp32")
    assert (lam32 > 0).all() and lam32.max() < 1e-8  # float32 sees curvature, tiny
    lam16, v16 = top("fp16")
    assert torch.allclose(lam16, lam32, rtol=0.05, atol=0)
    assert torch.all(_cos(v16.reshape(len(x), -1), v32.reshape(len(x), -1)).abs() > 0.95)
    attack = build_attack("curvature", net, 0.1, precision="fp16")  # the same products unscaled
    with attack.session(x, y) as (x0, _), torch.enable_grad():
        xr = x0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(attack.eot_objective_sum(xr), xr, create_graph=True)
        hv = torch.autograd.grad((g * torch.randn_like(xr)).sum(), xr)[0] if g.requires_grad else torch.zeros(1)
    assert torch.count_nonzero(g) == 0 and torch.count_nonzero(hv) == 0
