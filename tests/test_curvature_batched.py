"""The engine's batched Lanczos against torch.linalg.eigh on block-diagonal operators, float64."""

from __future__ import annotations

import pytest
import torch

from gradlab.curvature import BatchedEigenResult, batched_lanczos

F64 = torch.float64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # start vectors drawn from the global RNG: fixed per test


def _with_spectrum(eigs: torch.Tensor, seed: int) -> torch.Tensor:
    """Symmetric (B, D, D) matrices with the given eigenvalues (B, D) and random eigenvectors."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(*eigs.shape, eigs.shape[-1], generator=g, dtype=F64))
    return q @ torch.diag_embed(eigs) @ q.transpose(1, 2)


def _blocks(d: int = 24) -> torch.Tensor:
    """Five blocks: general indefinite, rank 3, negative definite, repeated top, identity plus rank 1."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, d, d, generator=g, dtype=F64)
    mats = (a + a.transpose(1, 2)) / 2
    low = torch.randn(d, 3, generator=g, dtype=F64)
    mats[1] = low @ low.T
    mats[2] = -(mats[2] @ mats[2].T) - 0.1 * torch.eye(d, dtype=F64)
    rep = torch.tensor([[4.0, 4.0, 4.0, 1.5] + torch.linspace(-1, 1, d - 4).tolist()], dtype=F64)
    mats[3] = _with_spectrum(rep, 1)[0]
    u = torch.randn(d, 1, generator=g, dtype=F64)
    mats[4] = torch.eye(d, dtype=F64) + u @ u.T
    return mats


def _matvec(mats):
    return lambda v: torch.einsum("bij,bj->bi", mats, v)


def _check_pairs(mats, res: BatchedEigenResult, atol: float) -> None:
    vec = res.eigenvectors
    k = vec.shape[1]
    # A v = lambda v for every returned pair, and the k vectors of a block are orthonormal
    resid = (torch.einsum("bij,bkj->bki", mats, vec) - res.eigenvalues.unsqueeze(-1) * vec).norm(dim=-1)
    assert resid.max() < atol
    gram = vec @ vec.transpose(1, 2)
    torch.testing.assert_close(gram, torch.eye(k, dtype=F64).expand_as(gram), atol=1e-10, rtol=0)


@pytest.mark.parametrize("largest", [True, False])
def test_top_and_bottom_k_match_eigh_on_mixed_blocks(largest):
    mats = _blocks()
    g = torch.Generator().manual_seed(3)
    v0 = torch.randn(5, 24, generator=g, dtype=F64)
    res = batched_lanczos(_matvec(mats), v0, 4, tol=1e-12, return_vectors=True, largest=largest, generator=g)
    ref = torch.linalg.eigvalsh(mats)
    ref = ref.flip(-1)[:, :4] if largest else ref[:, :4]
    assert res.eigenvalues.shape == (5, 4) and res.eigenvectors.shape == (5, 4, 24)
    torch.testing.assert_close(res.eigenvalues, ref, atol=1e-9, rtol=1e-9)
    assert res.converged.dtype == torch.bool and res.converged.all()
    assert 1 <= res.products <= 24
    assert (res.residuals <= 1e-12 * ref.abs().amax(-1, keepdim=True) + 1e-14).all()
    _check_pairs(mats, res, atol=1e-8)


def test_top_eigenvectors_match_eigh_where_the_gap_is_clear():
    mats = _blocks()[[0, 2, 4]]  # simple top eigenvalue in each
    res = batched_lanczos(_matvec(mats), torch.randn(3, 24, dtype=F64), 1, tol=1e-13, return_vectors=True)
    evals, evecs = torch.linalg.eigh(mats)
    assert ((evals[:, -1] - evals[:, -2]) > 1e-3).all()
    cos = (res.eigenvectors[:, 0] * evecs[:, :, -1]).sum(-1).abs()
    torch.testing.assert_close(cos, torch.ones_like(cos), atol=1e-10, rtol=0)


def test_low_rank_block_stops_early_and_fills_the_null_space():
    # rank 2, k = 5: two Ritz values, then the complement is one eigenspace (eigenvalue 0)
    g = torch.Generator().manual_seed(5)
    low = torch.randn(2, 30, 2, generator=g, dtype=F64)
    mats = low @ low.transpose(1, 2)
    res = batched_lanczos(_matvec(mats), torch.randn(2, 30, generator=g, dtype=F64), 5, tol=1e-12,
                          return_vectors=True, generator=g)
    ref = torch.linalg.eigvalsh(mats).flip(-1)[:, :5]
    torch.testing.assert_close(res.eigenvalues, ref, atol=1e-10, rtol=1e-10)
    assert res.converged.all() and res.products <= 5  # 2 steps, a restart, its breakdown
    _check_pairs(mats, res, atol=1e-9)


def test_repeated_eigenvalues_found_with_their_multiplicity():
    eigs = torch.tensor([[5.0, 5.0, 5.0, 2.0] + [1.0] * 26, [3.0, 3.0, -2.0, -2.0] + [0.5] * 26], dtype=F64)
    mats = _with_spectrum(eigs, 7)
    res = batched_lanczos(_matvec(mats), torch.randn(2, 30, dtype=F64), 4, tol=1e-12, return_vectors=True)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([[5.0, 5.0, 5.0, 2.0], [3.0, 3.0, 0.5, 0.5]], dtype=F64),
                               atol=1e-9, rtol=1e-9)
    assert res.converged.all() and res.products < 30
    _check_pairs(mats, res, atol=1e-8)
    low = batched_lanczos(_matvec(mats), torch.randn(2, 30, dtype=F64), 2, tol=1e-12, largest=False)
    torch.testing.assert_close(low.eigenvalues, torch.tensor([[1.0, 1.0], [-2.0, -2.0]], dtype=F64), atol=1e-9, rtol=1e-9)


def test_start_vector_that_is_an_eigenvector_does_not_end_the_search():
    eigs = torch.tensor([[1.0, 2.0, 3.0, 4.0, 9.0, 0.0]], dtype=F64)
    mats = torch.diag_embed(eigs)
    v0 = torch.zeros(1, 6, dtype=F64)
    v0[0, 1] = 1.0  # eigenvector of eigenvalue 2: its Krylov space breaks down at once
    res = batched_lanczos(_matvec(mats), v0, 2, tol=1e-12)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([[9.0, 4.0]], dtype=F64), atol=1e-10, rtol=0)
    assert res.converged.all()


def test_unconverged_rows_are_flagged_per_example():
    # row 0 is resolved exactly (2 I + rank 1); row 1 has a spread spectrum and only 4 products
    d = 60
    u = torch.randn(d, 1, dtype=F64)
    spread = _with_spectrum(torch.linspace(0.0, 10.0, d, dtype=F64).unsqueeze(0), 11)[0]
    mats = torch.stack([2 * torch.eye(d, dtype=F64) + u @ u.T, spread])
    res = batched_lanczos(_matvec(mats), torch.randn(2, d, dtype=F64), 1, max_iter=4, tol=1e-10)
    assert res.converged.tolist() == [True, False]
    assert res.products == 4
    top = torch.linalg.eigvalsh(mats)[:, -1]
    torch.testing.assert_close(res.eigenvalues[0, 0], top[0], atol=1e-10, rtol=0)
    # an unconverged row reports its Ritz value (below lambda_max) and a residual above tol
    assert res.eigenvalues[1, 0] < top[1] - 1e-6
    assert res.residuals[1, 0] > 1e-10 * res.eigenvalues[1, 0]
    # tol = 0 runs every allowed product and still flags the row
    res0 = batched_lanczos(_matvec(mats[1:]), torch.randn(1, d, dtype=F64), 1, max_iter=7, tol=0.0)
    assert res0.products == 7 and not res0.converged.any()


def test_exhausted_space_gives_the_whole_spectrum():
    mats = _blocks(d=6)
    res = batched_lanczos(_matvec(mats), torch.randn(5, 6, dtype=F64), 6, tol=0.0, return_vectors=True)
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(mats).flip(-1), atol=1e-10, rtol=1e-10)
    assert res.converged.all() and res.products <= 6
    _check_pairs(mats, res, atol=1e-9)


def test_float32_operator_accumulates_in_float64():
    # the operator runs in float32; the top eigenvalue is as accurate as float32 products allow
    mats = _blocks(d=40)[[0, 2, 4]]
    m32 = mats.float()
    calls = []

    def matvec(v):
        calls.append(v.dtype)
        return torch.einsum("bij,bj->bi", m32, v)

    res = batched_lanczos(matvec, torch.randn(3, 40), 1, tol=1e-5)
    ref = torch.linalg.eigvalsh(m32.double())
    norm = ref.abs().amax(-1)
    assert set(calls) == {torch.float32} and res.eigenvalues.dtype == F64 and res.converged.all()
    # errors relative to ||A||: float32 products carry ~1e-7 ||A|| of noise
    assert ((res.eigenvalues[:, 0] - ref[:, -1]).abs() <= 1e-5 * norm).all()


def test_rejects_a_start_that_is_not_a_batch():
    with pytest.raises(ValueError, match=r"v0 must be \(B, D\)"):
        batched_lanczos(lambda v: v, torch.ones(5), 1)
