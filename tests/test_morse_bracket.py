"""The Morse index by the Gauss-Radau rule with a node at 0: each start's bracket holds exactly
(against v^T 1(A < 0) v from the dense eigenvectors), an invariant Krylov space gives the exact
count, and the training-time Morse index of a small float64 model contains the dense Hessian's
fraction of negative eigenvalues within its reported error."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gradlab.curvature.density import radau_bracket, slq_density
from gradlab.curvature.sampling import make_generator, rademacher


def _random_symmetric(n, seed, shift=0.3):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    ev = torch.randn(n, generator=g, dtype=torch.float64) + shift
    return q @ torch.diag(ev) @ q.T, q[:, ev < 0]


def test_each_starts_bracket_contains_its_share_below_zero():
    for seed, steps in [(0, 4), (1, 9), (2, 15), (3, 25)]:
        A, neg = _random_symmetric(60, seed)
        res = slq_density(A, num_starts=3, lanczos_steps=steps, seed=seed)
        gen = make_generator(seed)
        starts = [rademacher(60, gen, device=torch.device("cpu")) for _ in range(3)]
        for (T, beta), v in zip(res.tridiagonals, starts):
            u = v / v.norm()
            share = float((neg.T @ u).pow(2).sum())  # v^T 1(A < 0) v for the unit start
            low, width = radau_bracket(T, beta, 0.0)
            assert low - 1e-10 <= share <= low + width + 1e-10, (seed, steps, low, share, width)
            assert width < 1
        frac = res.fraction_bracketed(0.0)
        assert frac.low <= frac.value <= frac.high


def test_an_invariant_krylov_space_counts_exactly():
    A = torch.diag(torch.tensor([-2.0, -1.0, 0.5, 1.0, 3.0], dtype=torch.float64))
    res = slq_density(A, num_starts=4, lanczos_steps=5, seed=0)
    frac = res.fraction_bracketed(0.0)
    assert frac.ambiguous < 1e-12
    assert abs(frac.value - 0.4) < 1e-12  # Rademacher starts: every coordinate weighs 1/5


def test_training_morse_index_contains_the_dense_fraction_within_its_error():
    from gradlab.curvature import dense_hessian
    from gradlab.probes.curvature_train import training_curvature

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(30, 5, dtype=torch.float64, generator=g), torch.randint(0, 3, (30,), generator=g))
    ev = torch.linalg.eigvalsh(dense_hessian(model, F.cross_entropy, batch))
    assert len(ev) == 75
    out = training_curvature(model, F.cross_entropy, batch, density=True)  # 4 starts x 30 steps < n
    tol = 1e-6 * float(ev.abs().max())
    strict, ambiguous = float((ev < -tol).double().mean()), float((ev.abs() <= tol).double().mean())
    assert 0.05 < strict < 0.6
    exact = strict + 0.5 * ambiguous  # numerically zero eigenvalues count half, as in the estimate
    assert abs(out["morse_index"] - exact) <= out["morse_index_error"]
    assert out["morse_index_low"] <= strict <= strict + ambiguous <= out["morse_index_high"]
    assert 0 < out["morse_index_stderr"] < out["morse_index_error"] < 0.5


def test_the_overview_draws_the_morse_index_with_its_bracket_in_one_panel():
    import pandas as pd

    from gradlab.training.overview import panels

    rows = [(step, "curvature", metric, value) for step in (10, 20)
            for metric, value in (("lambda_max", 2.0), ("morse_index", 0.3), ("morse_index_low", 0.2),
                                  ("morse_index_high", 0.4), ("morse_index_stderr", 0.01), ("morse_index_error", 0.1))]
    frame = pd.DataFrame(rows, columns=["step", "split", "metric", "value"])
    chosen = {title: lines for title, lines, _ in panels(frame)}
    assert set(chosen) == {"Morse index (with its bracket)", "curvature: lambda_max"}
    assert [label for label, _, _ in chosen["Morse index (with its bracket)"]] == [
        "curvature/morse_index", "curvature/morse_index_low", "curvature/morse_index_high"]
