"""The Gauss-Newton trace against the dense Hessian (float64): exact for piecewise-linear nets,
unbiased with an honest standard error otherwise, and a clear refusal outside its layer set."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradlab.curvature import HessianOperator, TRACE_METHODS, dense_hessian, gauss_newton_trace, is_piecewise_linear, trace_auto
from gradlab.core.modelstate import BATCH_NORMS
from gradlab.curvature.gauss_newton import Unsupported, _Batch, _loss_hessians
from gradlab.models import build_model
from gradlab.models.base import GradlabNet, Normalize
from gradlab.models.resnet import BasicBlock


@pytest.fixture(scope="module")
def batches(digits_small):
    x, y = digits_small
    x = x[:48].double()
    return [(x[:30], y[:30]), (x[30:48], y[30:48])]


@pytest.fixture(scope="module")
def digits_small():
    from gradlab.data import load_dataset

    d = load_dataset("digits", seed=0)
    return d.x_train[:64], d.y_train[:64]


def _spec():
    from gradlab.data import load_dataset

    return load_dataset("digits", seed=0).spec


def _prepare(model):
    """float64, and BatchNorm running statistics / affine parameters moved off their defaults."""
    torch.manual_seed(1)
    model = model.double()
    for m in model.modules():
        if isinstance(m, BATCH_NORMS):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def _dense_trace(op):
    """tr(H) from torch.func's dense Hessian; column by column through the HVPs where torch.func
    cannot build it (GroupNorm under vmap)."""
    try:
        return float(torch.trace(dense_hessian(op.model, op.loss_fn, op.batches, mode=op.mode)))
    except RuntimeError:
        return float(torch.trace(op.matmat(torch.eye(op.n, dtype=torch.float64))))


def _small_conv(act, norm):
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), norm(3), act(), nn.MaxPool2d(2),
                         nn.Conv2d(3, 4, 3, stride=2, padding=1), act(), nn.Flatten(), nn.Linear(16, 10))


def _tiny_resnet(act="relu", skip=True):
    return GradlabNet(Normalize([0.3], [0.4]),
                      [nn.Conv2d(1, 2, 3, padding=1, bias=False), BasicBlock(2, 2, 2, 1, act, "batch", "A", skip),
                       BasicBlock(2, 2, 3, 2, act, "batch", "A", skip)],
                      nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10)))


PIECEWISE_LINEAR = {
    "mlp relu": lambda: build_model("mlp", _spec(), width=12, depth=2),
    "mlp relu batchnorm residual": lambda: build_model("mlp", _spec(), width=8, depth=3, norm="batch", residual=True),
    "conv relu batchnorm maxpool": lambda: _small_conv(nn.ReLU, nn.BatchNorm2d),
    "resnet blocks": lambda: _tiny_resnet(),
    "logreg": lambda: build_model("logreg", _spec()),
}


@pytest.mark.parametrize("name", list(PIECEWISE_LINEAR))
def test_exact_for_piecewise_linear_nets(name, batches):
    model = _prepare(PIECEWISE_LINEAR[name]())
    assert is_piecewise_linear(model)
    op = HessianOperator(model, None, batches)
    res = gauss_newton_trace(op, seed=0)
    assert res.method == "gauss-newton (exact)" and res.stderr == 0.0 and res.num_matvecs == 0
    assert res.estimate == pytest.approx(_dense_trace(op), rel=1e-10)


def test_exact_with_dropout_in_train_mode(batches):
    model = _prepare(nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 10)))
    op = HessianOperator(model, None, batches, mode="train", seed=3)
    assert gauss_newton_trace(op).estimate == pytest.approx(_dense_trace(op), rel=1e-10)


SMOOTH = {
    "mlp tanh": lambda: build_model("mlp", _spec(), width=12, depth=2, act="tanh"),
    "mlp gelu layernorm": lambda: build_model("mlp", _spec(), width=12, depth=2, act="gelu", norm="layer"),
    "conv tanh groupnorm": lambda: _small_conv(nn.Tanh, lambda c: nn.GroupNorm(1, c)),
    "resnet blocks tanh": lambda: _tiny_resnet("tanh", skip=False),
    "conv1d sigmoid": lambda: nn.Sequential(nn.Flatten(), nn.Unflatten(1, (1, 64)), nn.Conv1d(1, 2, 5, padding=2, stride=4),
                                            nn.Sigmoid(), nn.Flatten(), nn.Linear(32, 10)),
}


@pytest.mark.parametrize("name", list(SMOOTH))
def test_unbiased_with_stderr_for_smooth_nets(name, batches):
    model = _prepare(SMOOTH[name]())
    assert not is_piecewise_linear(model)
    op = HessianOperator(model, None, batches)
    res = gauss_newton_trace(op, 60, seed=0)
    exact = _dense_trace(op)
    assert res.method == "gauss-newton" and res.num_matvecs == 120 and res.stderr > 0
    assert abs(res.estimate - exact) <= 4 * res.stderr
    assert res.stderr < 0.15 * abs(exact)


def test_gauss_newton_part_equals_dense_ggn(digits_small):
    """tr(G) against G = (1/N) sum J_n^T Lambda_n J_n built from torch.autograd.functional.jacobian."""
    x, y = digits_small
    x = x[:20].double()
    y = y[:20]
    model = _prepare(nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 10)))
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def logits_of(v):
        pd, off = {}, 0
        for n, p in zip(names, params):
            pd[n] = v[off: off + p.numel()].view_as(p)
            off += p.numel()
        return torch.func.functional_call(model, pd, (x,))

    J = torch.autograd.functional.jacobian(logits_of, flat)  # (N, C, P)
    p = model(x).softmax(-1).detach()
    lam = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    ggn = torch.einsum("ncp,ncd,ndq->pq", J, lam, J) / len(x)
    op = HessianOperator(model, None, (x, y))
    assert _Batch(op, 0).gauss_newton_trace() == pytest.approx(float(torch.trace(ggn)), rel=1e-10)


def test_generic_loss_path(digits_small):
    """Mean-squared error goes through torch.func per-example Hessians; cross-entropy's closed
    form agrees with that path."""
    x, _ = digits_small
    x = x[:40].double()
    model = _prepare(nn.Sequential(nn.Flatten(), nn.Linear(64, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 3)))
    target = torch.randn(40, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    op = HessianOperator(model, F.mse_loss, (x, target))
    res = gauss_newton_trace(op, 60, seed=1)
    assert abs(res.estimate - _dense_trace(op)) <= 4 * res.stderr

    z = torch.randn(40, 10, dtype=torch.float64)
    y = torch.randint(0, 10, (40,))
    closed = _loss_hessians(F.cross_entropy, z, y, F.cross_entropy(z, y))
    generic = _loss_hessians(lambda a, b: F.cross_entropy(a, b), z, y, F.cross_entropy(z, y))
    assert torch.allclose(closed, generic, atol=1e-12)


def test_refusals_and_auto_fallback(batches):
    prelu = _prepare(nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.PReLU(), nn.Linear(8, 10)))
    op = HessianOperator(prelu, None, batches)
    with pytest.raises(Unsupported, match="PReLU"):
        gauss_newton_trace(op)
    res = trace_auto(op, 20, seed=0)
    assert res.method == "xtrace" and res.num_matvecs == 20

    lin = nn.Linear(10, 10)
    shared = _prepare(nn.Sequential(nn.Flatten(), nn.Linear(64, 10), lin, nn.Tanh(), lin))
    with pytest.raises(Unsupported, match="ran 2 times"):
        gauss_newton_trace(HessianOperator(shared, None, batches))

    bn = _prepare(nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10)))
    assert not is_piecewise_linear(bn, "train")
    with pytest.raises(Unsupported, match="train mode"):
        gauss_newton_trace(HessianOperator(bn, None, batches, mode="train"))

    summed = HessianOperator(_prepare(PIECEWISE_LINEAR["mlp relu"]()), lambda z, y: F.cross_entropy(z, y, reduction="sum"),
                             batches)
    with pytest.raises(Unsupported, match="mean of per-example"):
        gauss_newton_trace(summed)


def test_cli_names_match_the_registry():
    from gradlab.probes import PROBES

    assert list(PROBES.entry("hessian").options["trace_method"].choices) == list(TRACE_METHODS)
