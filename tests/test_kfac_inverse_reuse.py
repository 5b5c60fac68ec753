"""K-FAC decomposes each set of factors once: an inverse step between two factor updates
(``inverse_every < factor_every``) keeps the eigenbases / Cholesky inverses it holds, with the same
steps as decomposing again (a copy of the optimizer whose held inverse is dropped before every
step), while a change of damping in factored mode still takes effect at the next inverse step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradlab.optim import build_optimizer


def _run(mode, steps, forget=False, monkeypatch=None, damping_at=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)
    opt = build_optimizer("kfac", model.parameters(), lr=0.2, factor_every=4, inverse_every=1, damping=0.05,
                          fisher_type="type-2", damping_mode=mode, kl_clip=0)
    opt.bind(model, F.cross_entropy)
    for t in range(steps):
        if forget:
            opt._inverse_of = None  # what every inverse step did before: decompose again
        if damping_at is not None and t == damping_at:
            opt.param_groups[0]["damping"] = 0.5
        opt.step(lambda: F.cross_entropy(model(x), y))
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("mode,fn", [("exact", "eigh"), ("factored", "cholesky_ex")])
def test_unchanged_factors_are_decomposed_once_for_the_same_steps(mode, fn, monkeypatch):
    calls = []
    inner = getattr(torch.linalg, fn)
    monkeypatch.setattr(torch.linalg, fn, lambda *a, **k: calls.append(1) or inner(*a, **k))
    kept = _run(mode, 9)
    assert len(calls) == 3 * 2 * 2  # factor updates at steps 0, 4, 8; two factors of two layers
    calls.clear()
    again = _run(mode, 9, forget=True)
    assert len(calls) == 9 * 2 * 2
    for a, b in zip(kept, again):
        assert torch.equal(a, b)


def test_a_new_damping_still_reaches_the_factored_inverse_at_the_next_inverse_step():
    changed, fresh = _run("factored", 3, damping_at=1), _run("factored", 3, damping_at=1, forget=True)
    same = _run("factored", 3)
    for a, b in zip(changed, fresh):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(changed, same))
