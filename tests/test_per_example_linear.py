"""Per-example moments of Linear layers from inputs and output gradients (the ghost trick) equal
those of the vmap per-example gradients in float64; where the trick does not apply it says so."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradlab.curvature.per_example_linear import linear_moments
from gradlab.probes.gradstats import batch_statistics, per_example_moments


def _batch(n_in=5, b=9, classes=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, n_in, generator=g, dtype=torch.float64), torch.randint(0, classes, (b,), generator=g)


@pytest.mark.parametrize("bias", [True, False])
def test_ghost_moments_equal_the_vmap_primitive_in_float64(bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7, bias=bias), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(),
                          nn.Linear(6, 3, bias=bias)).double()
    x, y = _batch()
    ghost = linear_moments(model, F.cross_entropy, x, y)
    ref = per_example_moments(model, F.cross_entropy, x, y, method="vmap")
    assert ghost is not None and set(ghost) == set(ref) == {"0", "2", "4"}
    for layer in ref:
        for got, want in zip(ghost[layer][:2], ref[layer][:2]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
        assert ghost[layer][2] == pytest.approx(ref[layer][2], rel=1e-10)
    assert all(p.grad is None for p in model.parameters())


def test_the_zoo_mlp_takes_the_ghost_path_and_its_statistics_match():
    from gradlab.models import build_model

    spec = _spec()
    model = build_model("mlp", spec, depth=2, width=8).double().eval()
    x = torch.randn(12, *spec.input_shape, dtype=torch.float64)
    y = torch.randint(0, spec.num_classes, (12,))
    assert linear_moments(model, F.cross_entropy, x, y) is not None
    auto = batch_statistics(model, F.cross_entropy, x, y)
    from gradlab.curvature.per_example import per_example_grads
    from gradlab.probes.gradstats import grouped, moments, statistics_from_moments

    grads = grouped(per_example_grads(model, F.cross_entropy, x, y, method="vmap"))
    for layer, g in grads.items():
        want = statistics_from_moments(*moments(g))
        for key, value in want.items():
            assert auto[layer][key] == pytest.approx(value, rel=1e-9, abs=1e-15), (layer, key)


def _spec():
    from gradlab.data import load_dataset

    return load_dataset("digits", seed=0).spec


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


class _Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x):
        return self.lin(x.unsqueeze(1).expand(-1, 2, -1)).sum(1)


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(6, 3)),  # a conv layer
    lambda: nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)),  # a non-Linear parameter
    _Twice,  # one Linear called twice
    _Seq,  # a (B, T, in) input
    lambda: nn.Linear(5, 3),  # the model is the layer (no module name)
])
def test_where_the_trick_does_not_apply_it_returns_none_and_auto_falls_back(make):
    torch.manual_seed(0)
    model = make().double()
    x, y = _batch()
    if isinstance(model, nn.Sequential) and isinstance(model[0], nn.Conv1d):
        x = x.unsqueeze(1)  # (B, 1, 5)
    assert linear_moments(model, F.cross_entropy, x, y) is None
    auto = per_example_moments(model, F.cross_entropy, x, y)
    ref = per_example_moments(model, F.cross_entropy, x, y, method="vmap")
    assert set(auto) == set(ref)
    for layer in ref:
        torch.testing.assert_close(auto[layer][0], ref[layer][0])


def test_a_frozen_linear_falls_back():
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    model[0].weight.requires_grad_(False)
    x, y = _batch()
    assert linear_moments(model, F.cross_entropy, x, y) is None
