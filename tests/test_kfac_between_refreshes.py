"""K-FAC over several steps, the steps between factor and inverse refreshes included, against a dense
float64 reference loop: factors from the curvature engine's KFACOperator (type-2, exact), their EMA,
the damped Kronecker inverse formed as a matrix and refreshed on its own schedule, kl-clip, weight
decay and heavy-ball momentum written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradlab.curvature import KFACOperator
from gradlab.optim import build_optimizer


def _flat(ts):
    return torch.cat([t.detach().reshape(-1) for t in ts])


def _kron_block(G, A):
    """kron(G, A) in the flat layout of (W, b): W row-major as (O, K) first, then the bias."""
    o, k1 = G.shape[0], A.shape[0]
    perm = [r * k1 + c for r in range(o) for c in range(k1 - 1)] + [r * k1 + k1 - 1 for r in range(o)]
    return torch.kron(G.contiguous(), A.contiguous())[perm][:, perm]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 5, 6),
                         nn.Tanh(), nn.Linear(6, 4)).double()


def _damped(G, A, lam, mode):
    eye = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731
    if mode == "exact":
        return _kron_block(G, A) + lam * eye(len(G) * len(A))
    pi = math.sqrt((torch.trace(A) / len(A)) / (torch.trace(G) / len(G)))
    return _kron_block(G + lam ** 0.5 / pi * eye(len(G)), A + pi * lam ** 0.5 * eye(len(A)))


@pytest.mark.parametrize("mode", ["exact", "factored"])
def test_kfac_steps_between_refreshes_equal_the_dense_preconditioned_update(mode):
    lr, mom, lam, clip, wd, decay = 0.3, 0.9, 0.05, 0.8, 0.01, 0.8
    factor_every, inverse_every, steps = 3, 2, 7
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 1, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (5,), generator=g))
               for _ in range(steps)]
    model, ref = _model(), _model()
    opt = build_optimizer("kfac", model.parameters(), lr=lr, momentum=mom, damping=lam, kl_clip=clip,
                          weight_decay=wd, factor_every=factor_every, inverse_every=inverse_every,
                          factor_decay=decay, fisher_type="type-2", damping_mode=mode)
    opt.bind(model, F.cross_entropy)
    params = list(ref.parameters())
    factors, inverse, buf, updates, clipped = None, None, None, 0, 0
    for t, (x, y) in enumerate(batches):
        if t % factor_every == 0:
            new = [(b.A.clone(), b.G.clone()) for b in
                   KFACOperator(ref, F.cross_entropy, (x, y), fisher_type="type-2", mode="train").blocks]
            updates += 1
            e = min(1 - 1 / updates, decay)
            factors = new if factors is None else [(e * a + (1 - e) * na, e * gg + (1 - e) * ng)
                                                   for (a, gg), (na, ng) in zip(factors, new)]
        if t % inverse_every == 0:
            inverse = torch.linalg.inv(torch.block_diag(*[_damped(G, A, lam, mode) for A, G in factors]))
        grad = _flat(torch.autograd.grad(F.cross_entropy(ref(x), y), params))
        D = inverse @ grad
        nu = min(1.0, math.sqrt(clip / (lr * lr * float(D @ grad))))
        clipped += nu < 1
        D = nu * D + wd * _flat(params)
        buf = D if buf is None else mom * buf + D
        with torch.no_grad():
            theta = _flat(params) - lr * buf
            torch.nn.utils.vector_to_parameters(theta, params)
        opt.step(lambda: F.cross_entropy(model(x), y))
        assert torch.allclose(_flat(model.parameters()), theta, atol=1e-11, rtol=1e-9), f"step {t}"
    assert 0 < clipped < steps  # both branches of the kl-clip were taken
