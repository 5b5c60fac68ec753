"""Per-example moments of Conv2d layers from captured inputs and output gradients equal those of
the vmap per-example gradients in float64; hooked_pass's loss and gradients equal autograd's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradlab.curvature.per_example_linear import hooked_pass, linear_moments
from gradlab.probes.gradstats import per_example_moments


def _cnn(bias=True, stride=1, padding=1, dilation=1):
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=stride, padding=padding, dilation=dilation, bias=bias), nn.Tanh(),
                         nn.MaxPool2d(2), nn.Conv2d(3, 4, (2, 3), padding=(1, 0), bias=bias), nn.ReLU(),
                         nn.Flatten(), nn.LazyLinear(3)).double()


@pytest.mark.parametrize("bias, stride, padding, dilation", [(True, 1, 1, 1), (False, 2, 0, 1), (True, 1, 2, 2)])
def test_conv_moments_equal_the_vmap_primitive_in_float64(bias, stride, padding, dilation):
    torch.manual_seed(0)
    model = _cnn(bias, stride, padding, dilation)
    x = torch.randn(7, 2, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    model(x)  # materialise the lazy layer
    got = linear_moments(model, F.cross_entropy, x, y)
    ref = per_example_moments(model, F.cross_entropy, x, y, method="vmap")
    assert got is not None and set(got) == set(ref) == {"0", "3", "6"}
    for layer in ref:
        for a, b in zip(got[layer][:2], ref[layer][:2]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
        assert got[layer][2] == pytest.approx(ref[layer][2], rel=1e-10)
    assert all(p.grad is None for p in model.parameters())


def test_grouped_or_circular_convs_fall_back():
    for conv in (nn.Conv2d(2, 4, 3, groups=2), nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular")):
        model = nn.Sequential(conv, nn.Flatten(), nn.LazyLinear(3)).double()
        x, y = torch.randn(4, 2, 5, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
        model(x)
        assert linear_moments(model, F.cross_entropy, x, y) is None


def test_hooked_pass_returns_the_loss_and_gradients_of_one_backward():
    torch.manual_seed(1)
    model = _cnn()
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    model(x)
    params = list(model.parameters())
    loss, grads, moments = hooked_pass(model, F.cross_entropy, x, y, params)
    ref_loss = F.cross_entropy(model(x), y)
    ref = torch.autograd.grad(ref_loss, params)
    assert float(loss) == float(ref_loss.detach())
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
    # the moments' mean gradient is the batch gradient: ||g||^2 per layer
    assert moments["0"][2] == pytest.approx(float(ref[0].pow(2).sum() + ref[1].pow(2).sum()), rel=1e-12)
