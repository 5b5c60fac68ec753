"""K-FAC's stride-1 convolution input moments without patches (gradlab.curvature.conv_moments)
against ``F.unfold`` patches and patches sliced by loops in float64, and the K-FAC operator of a
padded 3x3 stride-1 CNN against the Kronecker formula built by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradlab.curvature import KFACOperator
from gradlab.curvature.conv_moments import applies, patch_moments
from test_curvature_operators import kfac_reference, patches_by_loops


@pytest.mark.parametrize("shape,kernel,padding", [
    ((3, 2, 7, 6), (3, 3), (1, 1)),   # "same" 3x3: one border row and column per offset
    ((2, 3, 9, 8), (3, 3), (0, 0)),   # valid: two rows and columns
    ((2, 2, 10, 11), (5, 3), (2, 0)),  # rectangular kernel, padding on one axis only
    ((2, 2, 8, 8), (3, 3), (2, 2)),   # padding wider than the kernel's half: no border strip
    ((1, 1, 12, 9), (2, 2), (0, 1)),  # even kernel
])
def test_patch_moments_equal_the_unfold_patches(shape, kernel, padding):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u = F.unfold(x, kernel, padding=padding)  # (N, K, L)
    core, total = patch_moments(x, kernel, padding)
    assert torch.allclose(core, torch.einsum("nkl,njl->kj", u, u), atol=1e-12, rtol=0)
    assert torch.allclose(total, u.sum((0, 2)), atol=1e-12, rtol=0)
    rows = patches_by_loops(nn.Conv2d(shape[1], 1, kernel, padding=padding), x)  # independent of unfold
    assert torch.allclose(core, rows.T @ rows, atol=1e-12, rtol=0)


def test_only_stride_1_convolutions_use_the_shifted_moments():
    x = torch.zeros(2, 3, 8, 8)
    assert applies(nn.Conv2d(3, 4, 3, padding=1), x)
    assert not applies(nn.Conv2d(3, 4, 3, padding=1, stride=2), x)
    assert not applies(nn.Conv2d(3, 4, 3, padding=1, dilation=2), x)
    assert not applies(nn.Conv2d(3, 4, 1), x)  # 1x1: the input itself, nothing to save
    assert not applies(nn.Conv2d(3, 4, 7), torch.zeros(2, 3, 8, 8))  # borders wider than half the image


def same_cnn() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, (3, 5), padding=(1, 2)),
                         nn.Tanh(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).double()


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_kfac_of_a_same_padded_cnn_equals_the_kronecker_formula(fisher_type, monkeypatch):
    import gradlab.curvature.kfac as kfac_module

    monkeypatch.setattr(kfac_module, "SHIFTED_MIN_WORK", 0)  # the shifted path even on this tiny input
    model = same_cnn()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)
    assert all(applies(m, torch.zeros(1, m.in_channels, 6, 6)) for m in model if isinstance(m, nn.Conv2d))
    op = KFACOperator(model, None, (x, y), fisher_type=fisher_type)
    assert torch.allclose(op.to_dense(), kfac_reference(model, x, y, fisher_type), atol=1e-12)
