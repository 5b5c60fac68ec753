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


def _dist_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from gradlab.attacks.streamed import streamed_robustness
    from gradlab.core.distributed import current
    from gradlab.data.stream import eval_batches

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, x, y, _ = _setup()
        info = current()
        loader = DataLoader(TensorDataset(x, y), batch_sampler=eval_batches(len(y), 7, info))  # this rank's batches
        op = StreamedOperator(model, None, loader, dist=info)
        V = torch.randn(op.n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))  # rank 0's wins
        images = DataLoader(TensorDataset(x.sigmoid(), y), batch_sampler=eval_batches(len(y), 7, info))  # in [0, 1]
        table = streamed_robustness(model, images, "fgsm", [0.1], dist=info)
        torch.save({"HV": op.matmat(V), "grad": op.loss_and_gradient()[1], "n": op.num_samples,
                    "robust": float(table["robust_acc"][0])}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_stream_their_batches_and_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    from gradlab.attacks.streamed import streamed_robustness

    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    model, x, y, loader = _setup()
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    op = StreamedOperator(model, None, loader)
    images = DataLoader(TensorDataset(x.sigmoid(), y), batch_size=7)
    robust = float(streamed_robustness(model, images, "fgsm", [0.1])["robust_acc"][0])
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert got["n"] == 26 and torch.allclose(got["HV"], op.matmat(V), atol=1e-12)
        assert torch.allclose(got["grad"], op.loss_and_gradient()[1], atol=1e-12) and got["robust"] == robust
