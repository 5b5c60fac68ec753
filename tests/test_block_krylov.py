"""block_eigsh against dense eigendecompositions (float64): values, exact residuals, deflation."""

import pytest
import torch

from gradlab.core.errors import GradlabError
from gradlab.curvature.block_krylov import block_eigsh
from gradlab.curvature.operator import DenseOperator


def _matrix(ev, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(ev), len(ev), generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.as_tensor(ev, dtype=torch.float64)) @ Q.T


@pytest.mark.parametrize("which,k,block", [("LA", 1, 4), ("LA", 3, 4), ("SA", 2, 3)])
def test_values_and_residuals_match_the_dense_solution(which, k, block):
    A = _matrix(torch.cat([torch.tensor([5.0, 4.9, 4.8]), torch.linspace(-2, 2, 117)]))
    res = block_eigsh(A, k, which, block=block, tol=1e-10, return_vectors=True)
    ev = torch.linalg.eigvalsh(A)
    want = ev.flip(0)[:k] if which == "LA" else ev[:k]
    assert res.converged and torch.allclose(res.values, want, atol=1e-8)
    true_res = (A @ res.vectors - res.vectors * res.values).norm(dim=0)
    assert torch.allclose(res.residuals, true_res, atol=1e-10)  # computed from the stored images, not estimated
    assert res.num_matvecs % block == 0 or res.num_matvecs == 120


def test_a_block_uses_fewer_passes_than_single_vectors_on_clustered_top_eigenvalues():
    A = DenseOperator(_matrix(torch.cat([torch.tensor([1.0, 0.99, 0.98]), torch.rand(197, generator=torch.Generator().manual_seed(1)) * 0.9])))
    one = block_eigsh(A, 1, block=1, tol=1e-6, max_passes=200)
    four = block_eigsh(A, 1, block=4, tol=1e-6, max_passes=200)
    assert one.converged and four.converged and abs(four.values[0] - 1.0) < 1e-6
    assert four.num_matvecs // 4 < one.num_matvecs  # passes over the data


def test_an_invariant_subspace_is_refilled_and_bad_arguments_refused():
    u = torch.linalg.qr(torch.randn(30, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))[0]
    A = u @ torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)) @ u.T  # rank 2: the space closes after one pass
    res = block_eigsh(A, 2, block=4, tol=1e-10)
    assert res.converged and torch.allclose(res.values, torch.tensor([3.0, 1.0], dtype=torch.float64), atol=1e-10)
    with pytest.raises(GradlabError, match="invalid block"):
        block_eigsh(A, 3, block=2)
    with pytest.raises(GradlabError, match="unknown which"):
        block_eigsh(A, 1, "LM")
