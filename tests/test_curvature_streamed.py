"""StreamedOperator: a full-dataset curvature product accumulated batch by batch equals the product
over the concatenated batches (float64, against the dense Hessian and the in-memory operators)."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradlab.core.errors import GradlabError
from gradlab.curvature import HessianOperator, dense_hessian, eigsh
from gradlab.curvature.matrices import curvature_matrix
from gradlab.curvature.streamed import StreamedOperator


def _setup(dropout=0.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Dropout(dropout), nn.Linear(6, 3)).double()
    x, y = torch.randn(26, 5, dtype=torch.float64), torch.randint(0, 3, (26,))
    loader = DataLoader(TensorDataset(x, y), batch_size=7)  # 4 batches: 7, 7, 7, 5
    return model, x, y, loader


@pytest.mark.parametrize("merge_numel", [0, 10**6])  # one batch at a time, or all four merged
def test_hessian_product_over_four_batches_equals_the_concatenated_batch(merge_numel):
    model, x, y, loader = _setup()
    op = StreamedOperator(model, None, loader, merge_numel=merge_numel)
    V = torch.randn(op.n, 3, dtype=torch.float64)
    H = dense_hessian(model, None, (x, y))
    assert torch.allclose(op.matmat(V), H @ V, atol=1e-12, rtol=1e-10)
    assert op.num_samples == 26 and op.passes == 1 and op.num_matvecs == 3
    loss, g = op.loss_and_gradient()
    ref = HessianOperator(model, None, (x, y))
    loss_ref, g_ref = ref.loss_and_gradient()
    assert abs(loss - loss_ref) < 1e-12 and torch.allclose(g, g_ref, atol=1e-12)
    top = eigsh(op, k=2, tol=1e-8).values
    assert torch.allclose(top, torch.linalg.eigvalsh(H).flip(0)[:2], rtol=1e-7)


@pytest.mark.parametrize("matrix", ["ggn", "empirical-fisher"])
def test_other_matrices_equal_the_in_memory_operator(matrix):
    model, x, y, loader = _setup()
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64)
    streamed = StreamedOperator(model, None, loader, matrix=matrix).matmat(V)
    assert torch.allclose(streamed, curvature_matrix(matrix, model, None, (x, y)).matmat(V), atol=1e-12)


def test_train_mode_dropout_masks_match_the_in_memory_batches():
    model, x, y, loader = _setup(dropout=0.3)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64)
    batches = list(loader)
    mem = HessianOperator(model, None, batches, mode="train", seed=5).matmat(V)
    assert torch.allclose(StreamedOperator(model, None, loader, mode="train", seed=5).matmat(V), mem, atol=1e-12)


def test_kfac_and_empty_streams_are_refused():
    model, x, y, loader = _setup()
    with pytest.raises(GradlabError, match="cannot be accumulated"):
        StreamedOperator(model, None, loader, matrix="kfac")
    op = StreamedOperator(model, None, [])
    with pytest.raises(GradlabError, match="stream is empty"):
        op.matvec(torch.zeros(op.n, dtype=torch.float64))
