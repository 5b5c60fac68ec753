"""The forward-mode ``J v`` that replays the kept forward pass's Conv/Linear/BatchNorm outputs
(gradlab.curvature.tangent) against ``torch.func`` references in float64: the dense GGN from
explicit Jacobians, and ``torch.func.jvp`` of the model."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev, jvp

from gradlab.curvature import GGNOperator
from gradlab.curvature.tangent import CachedTangents, Mismatch, cacheable


class Block(nn.Module):
    """conv (no bias) -> BN -> in-place ReLU -> conv -> BN without affine, plus the input."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.c2, self.b2 = nn.Conv2d(3, 3, 3, padding="same"), nn.BatchNorm2d(3, affine=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return torch.relu(self.b2(self.c2(self.act(self.b1(self.c1(x))))) + x)


class Net(nn.Module):
    """A residual block, a conv whose output is changed in place, a Conv1d, and one Linear
    called twice (its output also changed in place)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.block = Block()
        self.c1d = nn.Conv1d(3, 2, 2)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.block(F.relu(self.stem(x).add_(0.25), inplace=True))  # (N, 3, 3, 3)
        h = self.c1d(h.flatten(2)).flatten(1)  # (N, 2 * 8)
        h = h[:, :8] + h[:, 8:]
        h = torch.tanh(self.fc(F.relu(self.fc(h), inplace=True)))
        return self.head(h)


def net() -> nn.Module:
    torch.manual_seed(0)
    model = Net().double()
    for bn in (model.block.b1, model.block.b2):  # running statistics away from 0 / 1
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    if model.block.b1.weight is not None:
        with torch.no_grad():
            model.block.b1.weight.uniform_(0.5, 1.5)
            model.block.b1.bias.uniform_(-0.3, 0.3)
    return model.eval()


def batch(n: int = 5):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def dense_ggn(model, x, y, names):
    """``J^T H_out J`` from explicit Jacobians over the named parameters."""
    params = dict(model.named_parameters())
    chosen = {k: params[k].detach() for k in names}
    jac = jacrev(lambda p: functional_call(model, {**params, **p}, (x,)))(chosen)
    z = model(x).detach()
    J = torch.cat([jac[k].reshape(z.numel(), -1) for k in names], dim=1)
    H = hessian(lambda zz: F.cross_entropy(zz, y))(z).reshape(z.numel(), z.numel())
    return J.T @ H @ J


def test_every_layer_of_the_test_net_is_replayed():
    model = net()
    kinds = {type(m) for m in model.modules() if cacheable(m)}
    assert kinds == {nn.Conv2d, nn.Conv1d, nn.Linear, nn.BatchNorm2d}
    assert not cacheable(nn.BatchNorm2d(3).train())  # batch statistics: not an affine map
    assert not cacheable(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    patched = nn.Linear(2, 2)
    patched.forward = lambda t: t  # a user's own replacement is kept
    assert not cacheable(patched)


@pytest.mark.parametrize("subset", [None, ["block.c1.weight", "block.b1.weight", "fc.bias", "c1d.weight"]],
                         ids=["all", "subset"])
def test_replayed_ggn_equals_explicit_jacobians(subset):
    model = net()
    x, y = batch()
    op = GGNOperator(model, None, (x, y), params=subset, jvp="forward")
    G = op.to_dense()
    assert op.linearization(0).cache is not None  # the replay was used, not the fallback
    assert subset is None or sorted(op.param_names) == sorted(subset)
    ref = dense_ggn(model, x, y, op.param_names)  # the operator's flat layout (model order)
    assert torch.allclose(G, ref, atol=1e-12, rtol=1e-9)
    # products repeat: the in-place ReLUs of the replayed pass did not change the recorded outputs
    assert torch.allclose(op.to_dense(), G, atol=1e-14, rtol=0)


def test_replayed_jvp_equals_torch_func_jvp():
    model = net()
    x, y = batch()
    op = GGNOperator(model, None, (x, y), jvp="forward")
    lin = op.linearization(0)
    v = torch.randn(op.n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    vs = op.unflatten(v)
    names = [k for k, _ in model.named_parameters()]
    primals = {k: p.detach() for k, p in model.named_parameters()}
    with torch.no_grad():
        ref = jvp(lambda p: functional_call(model, p, (x,)), (primals,), (dict(zip(names, vs)),))[1]
    assert torch.allclose(lin.jvp(vs), ref, atol=1e-13, rtol=1e-11)
    assert lin.cache is not None


def test_a_layer_called_differently_from_the_recorded_pass_raises_mismatch():
    model = net()
    x, _ = batch()
    cache = CachedTangents(model)
    with cache.record(), torch.no_grad():
        model(x)
    with torch.no_grad(), fwAD.dual_level(), cache.replay():
        with pytest.raises(Mismatch):
            model(x[:3])  # another batch: the recorded outputs do not apply
    assert "forward" not in vars(model.stem)  # the layers' own forward is back
    assert torch.allclose(model(x), net()(x))
