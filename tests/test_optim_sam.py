"""sam and asam: the ascent step by hand, the step over a base optimizer, and training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradlab.optim import build_optimizer


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    return model, x, y


@pytest.mark.parametrize("name", ["sam", "asam"])
def test_ascent_step_is_rho_scaled_gradient_by_hand(name):
    model, x, y = _problem()
    params = list(model.parameters())
    opt = build_optimizer(name, params, rho=0.3)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    g = torch.cat([t.reshape(-1) for t in grads])
    w = torch.cat([p.detach().reshape(-1) for p in params])
    if name == "sam":  # e = rho g / |g|
        want = 0.3 * g / g.norm()
    else:  # e = rho T^2 g / |T g|, T = |w| + eta
        t = w.abs() + 0.01
        want = 0.3 * t * t * g / (t * g).norm()
    e = torch.cat([t.reshape(-1) for t in opt.ascent(list(grads))])
    assert torch.allclose(e, want, atol=1e-14)
    assert e.norm() == pytest.approx(0.3) if name == "sam" else True


@pytest.mark.parametrize("base", ["sgd", "momentum", "adam"])
def test_step_is_the_base_step_with_the_gradient_at_the_perturbed_point(base):
    model, x, y = _problem()
    twin, _, _ = _problem()
    params, tparams = list(model.parameters()), list(twin.parameters())
    opt = build_optimizer("sam", params, lr=0.1, rho=0.2, base=base)
    ref = build_optimizer(base, tparams, lr=0.1)
    for _ in range(3):
        loss = lambda: F.cross_entropy(model(x), y)  # noqa: E731
        # by hand on the twin: gradient, perturb, gradient there, restore, base step
        g = torch.autograd.grad(F.cross_entropy(twin(x), y), tparams)
        norm = torch.cat([t.reshape(-1) for t in g]).norm()
        saved = [p.detach().clone() for p in tparams]
        with torch.no_grad():
            for p, gi in zip(tparams, g):
                p.add_(0.2 * gi / norm)
        g2 = torch.autograd.grad(F.cross_entropy(twin(x), y), tparams)
        with torch.no_grad():
            for p, s in zip(tparams, saved):
                p.copy_(s)
        for p, gi in zip(tparams, g2):
            p.grad = gi
        ref.step()
        opt.step(loss)
        for a, b in zip(params, tparams):
            assert torch.allclose(a, b, atol=1e-13)


def test_sam_and_asam_train_the_digits_mlp_through_gradlab_train(tmp_path):
    import pandas as pd

    from clihelp import train_in_process

    for name in ("sam", "asam"):
        run = train_in_process("--runs-dir", tmp_path / name, "--opt", name, "--epochs", "2", "--batch-size", "64",
                               "--width", "32", "--seed", "0")
        s = pd.read_csv(run / "summary.csv").iloc[0]
        assert s["status"] == "completed" and s["test_acc"] > 0.75, (name, s["test_acc"])
