"""The fraction of a spectrum below a threshold (the Morse index) from the SLQ density,
against matrices of known spectrum."""

from __future__ import annotations

import pytest
import torch


def _symmetric_with(eigs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=gen, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T


def test_fraction_below_zero_is_the_morse_index_within_its_error():
    from gradlab.curvature.density import slq_density

    eigs = [-3.0 + 0.01 * i for i in range(60)] + [0.5 + 0.02 * i for i in range(140)]  # 30% negative
    A = _symmetric_with(eigs)
    res = slq_density(A, num_starts=24, lanczos_steps=60, seed=1)
    frac = res.fraction_below(0.0)
    assert frac.starts == 24 and frac.ambiguous == pytest.approx(0.0, abs=1e-12)
    assert abs(frac.value - 0.3) <= 4 * frac.std_error and frac.std_error < 0.02
    assert frac.low <= 0.3 <= frac.high
    # exact Lanczos (steps = n): each start's estimate is v^T P v, P the projector on the negative space
    small = _symmetric_with([-1.0, -2.0, 1.0, 2.0, 3.0], seed=2)
    r = slq_density(small, num_starts=2, lanczos_steps=5, seed=3)
    vals, vecs = torch.linalg.eigh(small)
    P = vecs[:, vals < 0] @ vecs[:, vals < 0].T
    gen = __import__("gradlab.curvature.sampling", fromlist=["x"])
    g = gen.make_generator(3)
    starts = [gen.rademacher(5, g, device=torch.device("cpu")) for _ in range(2)]
    want = sum(float(v @ P @ v / (v @ v)) for v in starts) / 2
    assert r.fraction_below(0.0).value == pytest.approx(want, abs=1e-10)


def test_nodes_near_zero_are_ambiguous_and_bounded():
    from gradlab.curvature.density import slq_density

    eigs = [-1.0] * 10 + [0.0] * 20 + [1.0] * 20  # a flat subspace: 40% zero eigenvalues
    res = slq_density(_symmetric_with(eigs), num_starts=16, lanczos_steps=50, seed=0)
    strict = res.fraction_below(0.0, zero_tol=1e-8)
    assert strict.ambiguous == pytest.approx(0.4, abs=0.15)
    assert strict.low <= 0.2 <= strict.value <= 0.6 <= strict.high  # strictly negative: 20%; not positive: 60%
    assert strict.value == pytest.approx(0.2 + 0.5 * 0.4, abs=0.15)


def test_hessian_probe_reports_the_morse_index_of_the_dense_hessian():
    from torch import nn

    from gradlab.curvature import dense_hessian
    from gradlab.probes.hessian import hessian_probe

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    rep = hessian_probe(model, [(x, y)], top_k=1, bottom_k=1, density=True, density_starts=16,
                        density_steps=60)
    H = dense_hessian(model, torch.nn.functional.cross_entropy, (x, y))
    ev = torch.linalg.eigvalsh((H + H.T) / 2)
    exact = float((ev < -1e-10 * ev.abs().max()).double().mean())
    m = rep.metrics()
    assert 0 < exact < 0.5 and m["morse_index_stderr"] > 0
    assert abs(m["morse_index"] - exact) <= 4 * m["morse_index_stderr"] + 0.02
