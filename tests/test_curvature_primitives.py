"""The engine's single primitives: probe sampler, Hutchinson diagonal, Lanczos core (float64)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from gradlab.curvature import (DenseOperator, Lanczos, gaussian, gaussian_like, hutchinson_diagonal,
                               rademacher, rademacher_like)
from gradlab.optim.adahessian import AdaHessian
from gradlab.optim.curvature_gd import CurvatureGD

F64 = torch.float64


def _spd(n: int, seed: int) -> torch.Tensor:
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return a @ a.T + 0.1 * torch.eye(n, dtype=F64)


# ------------------------------------------------------------------ sampler
def test_rademacher_flat_blocks_and_lists_are_one_draw():
    z = rademacher((7, 3), torch.Generator().manual_seed(1), dtype=torch.float32)
    assert z.shape == (7, 3) and z.dtype == torch.float32 and bool(((z == 1) | (z == -1)).all())
    # a flat vector, a block and a list of tensors come from the same stream for the same seed
    flat = rademacher(21, torch.Generator().manual_seed(1), dtype=torch.float32)
    assert torch.equal(flat.view(7, 3), z)
    parts = rademacher_like([torch.zeros(4, 2), torch.zeros(13)], torch.Generator().manual_seed(1))
    assert torch.equal(torch.cat([p.reshape(-1) for p in parts]), flat)
    assert rademacher(5, torch.Generator().manual_seed(0), dtype=torch.int8).dtype == torch.int8


def test_gaussian_draws_from_the_generator_only():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    g = gaussian((4, 5), torch.Generator().manual_seed(2))
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is untouched
    assert g.dtype == F64 and torch.equal(g, torch.randn(4, 5, generator=torch.Generator().manual_seed(2), dtype=F64))
    like = gaussian_like([torch.zeros(3, dtype=torch.float32), torch.zeros(2, 2, dtype=F64)],
                         torch.Generator().manual_seed(2))
    assert [t.shape for t in like] == [(3,), (2, 2)] and [t.dtype for t in like] == [torch.float32, F64]


# ------------------------------------------------------------------ Hutchinson diagonal
def test_hutchinson_diagonal_over_all_sign_patterns_is_exact_blockwise():
    # Averaged over all 2^n sign vectors, z_i z_j cancels for i != j: the estimate is diag(H) exactly.
    H = _spd(6, 0)
    sizes = [2, 4]
    patterns = iter(torch.tensor(list(itertools.product([-1.0, 1.0], repeat=6)), dtype=F64))
    lasts = []

    def product(z, last):
        lasts.append(last)
        return list(torch.split(H @ torch.cat(z), sizes))

    like = [torch.zeros(2, dtype=F64), torch.zeros(4, dtype=F64)]
    est, se = hutchinson_diagonal(product, like, 64, draw=lambda _: torch.split(next(patterns), sizes),
                                  with_stderr=True)
    torch.testing.assert_close(torch.cat(est), torch.diagonal(H), rtol=1e-13, atol=1e-13)
    assert lasts == [False] * 63 + [True]
    # the standard error is the sample std / sqrt(m) of the 64 samples z * (H z)
    Z = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=6)), dtype=F64)
    samples = Z * (Z @ H)
    torch.testing.assert_close(torch.cat(se), samples.std(0) / 8, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("cls", [AdaHessian, CurvatureGD])
def test_optimizers_take_their_diagonal_from_the_engine_estimator(cls):
    # loss 0.5 w^T A w over two parameters: the optimizer's raw diagonal is z * (A z) with z drawn
    # by rademacher_like from a generator seeded like the optimizer's
    A = _spd(7, 3)
    w1, w2 = nn.Parameter(torch.ones(3, dtype=F64)), nn.Parameter(torch.ones(2, 2, dtype=F64))
    opt = cls([w1, w2], seed=5, hessian_samples=3)

    def closure():
        w = torch.cat([w1.reshape(-1), w2.reshape(-1)])
        return 0.5 * w @ A @ w

    _, diag = opt._grad_and_diag(closure)
    gen = torch.Generator().manual_seed(5)
    expected = torch.zeros(7, dtype=F64)
    for _ in range(3):
        z = torch.cat([t.reshape(-1) for t in rademacher_like([w1, w2], gen)])
        expected += z * (A @ z) / 3
    torch.testing.assert_close(torch.cat([d.reshape(-1) for d in diag]), expected, rtol=1e-12, atol=1e-12)
    assert opt.hvp_count == 3


# ------------------------------------------------------------------ Lanczos core
def test_batched_rows_on_one_operator_equal_separate_runs():
    A = _spd(30, 1)
    v0 = torch.randn(3, 30, generator=torch.Generator().manual_seed(4), dtype=F64)
    together = Lanczos(DenseOperator(A), v0)
    for _ in range(12):
        together.step()
    for b in range(3):
        alone = Lanczos(DenseOperator(A), v0[b : b + 1])
        for _ in range(12):
            alone.step()
        torch.testing.assert_close(together.alpha[b], alone.alpha[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(together.beta[b], alone.beta[0], rtol=1e-12, atol=1e-12)
    # the basis stays orthonormal (full reorthogonalisation) and A Q = Q T + beta q e^T holds
    Q = together.basis()  # (3, 12, 30)
    torch.testing.assert_close(Q @ Q.transpose(1, 2), torch.eye(12, dtype=F64).expand(3, -1, -1), atol=1e-12, rtol=0)
    T = together.tridiagonal()
    resid = (A @ Q.transpose(1, 2)) - Q.transpose(1, 2) @ T  # (3, 30, 12): only the last column remains
    assert resid[..., :-1].abs().max() < 1e-10


def test_callable_batched_mode_matches_the_operator_mode():
    mats = torch.stack([_spd(20, s) for s in range(2)])
    v0 = torch.randn(2, 20, generator=torch.Generator().manual_seed(5), dtype=F64)
    batched = Lanczos(lambda V: torch.einsum("bij,bj->bi", mats, V), v0)
    for _ in range(8):
        batched.step()
    for b in range(2):
        one = Lanczos(DenseOperator(mats[b]), v0[b : b + 1])
        for _ in range(8):
            one.step()
        torch.testing.assert_close(batched.alpha[b], one.alpha[0], rtol=1e-12, atol=1e-12)
    assert batched.products == 8


def test_breakdown_restarts_or_stops_per_row():
    # diag with 3 distinct eigenvalues: the Krylov space of a generic start has dimension 3
    D = torch.diag(torch.tensor([5.0] * 4 + [2.0] * 3 + [-1.0] * 3, dtype=F64))
    v0 = torch.randn(1, 10, generator=torch.Generator().manual_seed(6), dtype=F64)
    stop = Lanczos(DenseOperator(D), v0, restart_on_breakdown=False)
    while not stop.exhausted:
        stop.step()
    assert stop.steps == 3
    torch.testing.assert_close(stop.ritz()[0][0], torch.tensor([-1.0, 2.0, 5.0], dtype=F64), atol=1e-10, rtol=0)
    go = Lanczos(DenseOperator(D), v0, generator=torch.Generator().manual_seed(0))
    while not go.exhausted:
        go.step()
    assert go.steps == 10 and int(go.block_start[0]) > 0  # restarted, then spanned the space
    torch.testing.assert_close(go.ritz()[0][0], torch.diagonal(D).sort().values, atol=1e-10, rtol=0)
    # in a batch, a row that stops early is frozen (zero vectors) while the other goes on
    v = torch.cat([v0, torch.randn(1, 10, generator=torch.Generator().manual_seed(7), dtype=F64)])
    mats = torch.stack([D, _spd(10, 2)])
    both = Lanczos(lambda V: torch.einsum("bij,bj->bi", mats, V), v, restart_on_breakdown=False)
    for _ in range(6):
        both.step()
    assert both.stopped.tolist() == [True, False] and not both.exhausted
    theta, S, _ = both.ritz()
    weight = S[0, 0, :] ** 2  # quadrature weights of the stopped row: all on its 3 true nodes
    torch.testing.assert_close(theta[0][weight > 1e-12], torch.tensor([-1.0, 2.0, 5.0], dtype=F64), atol=1e-10, rtol=0)
