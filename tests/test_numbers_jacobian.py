"""Jacobian verdicts at criticality, the maps the isometry statistics describe, and the spectral
radius (issue 14, "Jacobian verdicts at criticality" and "Speed"), against exact float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import jacrev, vmap

from gradlab.models import build_model
from gradlab.models.base import GradlabNet, Normalize
from gradlab.probes.jacobian import HIDDEN, hidden_span, jacobian_probe, report_lines
from gradlab.probes.jacobian_spectra import spectral_radius


def relu_mlp(widths, seed=0):
    torch.manual_seed(seed)
    blocks = [nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(widths[:-2], widths[1:-1])]
    return GradlabNet(Normalize([0.3], [0.2]), blocks, nn.Linear(widths[-2], widths[-1])).double()


def test_hidden_to_hidden_map_matches_exact_jacobians():
    model = relu_mlp([5, 7, 7, 7, 3])
    x = torch.rand(4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rep = jacobian_probe(model, x, method="dense", keep_jacobians=True)
    assert [ls.name for ls in rep.layers] == ["input-output", HIDDEN, "blocks.0", "blocks.1", "blocks.2", "head"]
    assert rep.hidden_span == (1, 3)
    hidden = rep.map(HIDDEN)
    assert (hidden.in_dim, hidden.out_dim, hidden.depth) == (7, 7, None)
    h1 = model.block_inputs(x)[1]
    exact = vmap(jacrev(lambda h: model.blocks[2](model.blocks[1](h))))(h1).detach()  # (4, 7, 7)
    torch.testing.assert_close(hidden.jacobian, exact, rtol=1e-12, atol=1e-14)
    # the chain rule: the product of the two layer maps
    torch.testing.assert_close(hidden.jacobian, rep.map("blocks.2").jacobian @ rep.map("blocks.1").jacobian,
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(hidden.singular_values, torch.linalg.svdvals(exact), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(hidden.spectral_radius, torch.linalg.eigvals(exact).abs().amax(-1), rtol=1e-10, atol=1e-13)
    metrics = rep.metrics()
    assert metrics["hh_max_sv"] == pytest.approx(float(torch.linalg.svdvals(exact)[:, 0].mean()), rel=1e-10)
    assert metrics["verdict_layers"] == "blocks.1 blocks.2"  # the square maps; not 5 -> 7 nor 7 -> 3


def test_hidden_span_rule():
    assert hidden_span([(1, 64), (1, 256), (1, 256), (1, 256), (1, 256)]) == (1, 4)
    assert hidden_span([(1, 6), (1, 6), (1, 6)]) is None  # one square block after the first: no product
    assert hidden_span([(1, 3), (1, 8), (1, 8), (1, 8), (1, 4), (1, 4)]) == (1, 3)  # the longest run
    assert hidden_span([(1, 3), (1, 8), (1, 4)]) is None


@pytest.fixture(scope="module")
def probe_at():
    from gradlab.data import load_dataset

    data = load_dataset("digits", seed=0)
    x = data.x_train[:8]

    def run(sigma_w):
        torch.manual_seed(0)
        model = build_model("mlp", data, depth=4, width=256, act="relu", init="gaussian", sigma_w=sigma_w)
        return jacobian_probe(model, x, method="dense")
    return run


def test_relu_at_criticality_is_stable(probe_at):
    rep = probe_at(math.sqrt(2.0))  # sigma_w^2 = 2: chi_1 = sigma_w^2 E[relu'^2] = 1 (Poole et al. 2016)
    rate, verdict = rep.gain_rate(0.1)
    assert verdict == "stable", rate
    assert abs(rate - 1) < 0.1
    maps, chi, basis = rep.verdict_basis()
    assert [ls.name for ls in maps] == ["blocks.1", "blocks.2", "blocks.3"] and "square" in basis
    # the non-square first and last maps would have biased it: ~4 (256x64) and ~2 (linear head)
    first, head = rep.map("blocks.0").stats()["mean_sq_sv"], rep.map("head").stats()["mean_sq_sv"]
    assert 3 < first < 5 and 1.5 < head < 2.5
    lines = report_lines(rep, rep.summary(), rep.metrics(0.1), 0.1)
    assert lines[0].startswith("input-output map (10x64: logits per normalized input)")
    assert lines[1].startswith("hidden-to-hidden map (256x256: blocks.1..blocks.3")
    assert "verdict: stable" in lines[2] and "blocks.1 blocks.2 blocks.3" in lines[2]


@pytest.mark.parametrize("sigma_w, verdict", [(2.0, "exploding"), (1.0, "vanishing")])
def test_far_from_criticality_is_not_stable(probe_at, sigma_w, verdict):
    rep = probe_at(sigma_w)  # chi_1 = sigma_w^2 / 2: 2 (rate ~1.41) and 0.5 (rate ~0.71)
    rate, got = rep.gain_rate(0.1)
    assert got == verdict
    assert rate == pytest.approx(sigma_w / math.sqrt(2), rel=0.1)


def test_no_square_maps_normalises_each_layer_by_its_shape():
    torch.manual_seed(0)
    model = build_model("mlp", _spec(), depth=1, width=256, act="relu", init="gaussian", sigma_w=math.sqrt(2.0))
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    rep = jacobian_probe(model, x, method="dense")
    maps, chi, basis = rep.verdict_basis()
    assert [ls.name for ls in maps] == ["blocks.0", "head"] and "shape" in basis
    j = rep.map("blocks.0")
    assert chi[0] == pytest.approx(float(j.singular_values.pow(2).sum(1).mean()) / j.out_dim, rel=1e-10)


def _spec():
    from gradlab.data.base import DataSpec

    return DataSpec("digits", (1, 8, 8), 10, [0.3], [0.37])


def _nonnormal(n, seed, scale=1.0):
    """Q (diag(d) + scale N) Q^T with N strictly upper triangular: eigenvalues d, non-normal."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, generator=g, dtype=torch.float64)
    t = torch.diag(d) + scale * torch.triu(torch.randn(n, n, generator=g, dtype=torch.float64), 1)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ t @ q.T, float(d.abs().max())


def test_spectral_radius_matches_eigvals():
    g = torch.Generator().manual_seed(0)
    n = 40
    gauss = torch.randn(6, n, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    relu = gauss * (torch.rand(6, n, 1, generator=g) > 0.5)             # zero rows (inactive units)
    cols = gauss * (torch.rand(6, 1, n, generator=g) > 0.3)             # zero columns
    both = relu * (torch.rand(6, 1, n, generator=g) > 0.3)
    for batch in (gauss, relu, cols, both):
        torch.testing.assert_close(spectral_radius(batch), torch.linalg.eigvals(batch).abs().amax(-1),
                                   rtol=1e-12, atol=1e-14)
    # non-normal: ||N|| ~ ||diag||, eigenvalues still well determined; against the known diagonal
    nn_mats, radii = zip(*(_nonnormal(12, s) for s in range(4)))
    nn_batch = torch.stack(nn_mats)
    torch.testing.assert_close(spectral_radius(nn_batch), torch.tensor(radii, dtype=torch.float64), rtol=1e-8, atol=0)
    # strongly non-normal, with zero rows: the deflation changes nothing against eigvals
    far = torch.stack([_nonnormal(n, s, scale=5.0)[0] for s in range(3)])
    far = far * (torch.rand(3, n, 1, generator=g) > 0.4)
    torch.testing.assert_close(spectral_radius(far), torch.linalg.eigvals(far).abs().amax(-1), rtol=1e-6, atol=0)
    # a nilpotent Jordan block with a zero row and the zero matrix: radius 0
    jordan = torch.diag(torch.ones(n - 1, dtype=torch.float64), 1)
    zero = torch.zeros(n, n, dtype=torch.float64)
    assert spectral_radius(torch.stack([jordan, zero])).abs().max() < 1e-12
    # companion matrix of (z - 3)(z + 2)(z - 0.5): radius 3, the dominant root
    comp = torch.tensor([[0.0, 0.0, -3.0], [1.0, 0.0, 5.5], [0.0, 1.0, 1.5]], dtype=torch.float64)
    assert float(spectral_radius(comp.unsqueeze(0))[0]) == pytest.approx(3.0, rel=1e-12)


def test_spectral_radius_restores_the_thread_count():
    before = torch.get_num_threads()
    spectral_radius(torch.randn(2, 5, 5, dtype=torch.float64))
    assert torch.get_num_threads() == before
