"""The Gram-matrix form of the Linear layers' per-example moments (taken when the batch is small
next to the layer) equals the vmap per-example gradients' moments in float64, with and without
a bias, and the mean-gradient form on the same inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradlab.curvature import per_example_linear as pel
from gradlab.probes.gradstats import per_example_moments


@pytest.mark.parametrize("bias", [True, False])
def test_gram_moments_equal_the_vmap_primitive_and_the_direct_form(bias):
    torch.manual_seed(0)
    # batch 4 against layers 12 -> 16 -> 3: B (in + out) < 2 in out for the first two layers
    model = nn.Sequential(nn.Linear(12, 16, bias=bias), nn.Tanh(), nn.Linear(16, 16, bias=bias), nn.Tanh(),
                          nn.Linear(16, 3)).double()
    x, y = torch.randn(4, 12, dtype=torch.float64), torch.tensor([0, 2, 1, 2])
    assert 4 * (12 + 16) < 2 * 12 * 16
    ghost = pel.linear_moments(model, F.cross_entropy, x, y)
    ref = per_example_moments(model, F.cross_entropy, x, y, method="vmap")
    for layer in ref:
        for got, want in zip(ghost[layer][:2], ref[layer][:2]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
        assert ghost[layer][2] == pytest.approx(ref[layer][2], rel=1e-10)
    a, g = torch.randn(4, 12, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64)
    for module in (model[0], nn.Linear(12, 16).double()):
        gram, direct = pel._linear_gram(module, a, g, 4), pel._linear_direct(module, a, g, 4)
        for got, want in zip(gram[:2], direct[:2]):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
        assert gram[2] == pytest.approx(direct[2], rel=1e-12)
