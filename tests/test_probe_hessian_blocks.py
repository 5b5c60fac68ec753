"""``probe hessian --per-layer / --params``: each block's matrix is the diagonal block of the full
matrix, checked against dense float64 references (torch.func Hessian, explicit J^T H J, per-example
gradient outer products; the full Fisher/K-FAC operators' dense diagonal blocks) for every --matrix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from gradlab.core.errors import GradlabError
from gradlab.curvature import FisherOperator, KFACOperator, dense_hessian
from gradlab.curvature.blocks import CoordinateOperator, parameter_blocks
from gradlab.probes.hessian_blocks import block_curvature
from test_curvature_operators import ggn_reference


def tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    g = torch.Generator().manual_seed(0)
    return model, (torch.rand(30, 5, dtype=torch.float64, generator=g), torch.randint(0, 3, (30,), generator=g))


def empirical_fisher_reference(model, x, y):
    """``(1/N) sum_n g_n g_n^T`` with per-example gradients of torch.func."""
    named = {k: p.detach() for k, p in model.named_parameters()}

    def loss_one(pd, xi, yi):
        return F.cross_entropy(functional_call(model, pd, (xi[None],)), yi[None])

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(named, x, y)
    G = torch.cat([g[k].reshape(len(x), -1) for k in named], dim=1)
    return G.T @ G / len(x)


def full_reference(matrix, model, batch):
    x, y = batch
    if matrix == "hessian":
        return dense_hessian(model, F.cross_entropy, batch)
    if matrix == "ggn":
        return ggn_reference(model, F.cross_entropy, x, y)
    if matrix == "empirical-fisher":
        return empirical_fisher_reference(model, x, y)
    if matrix == "fisher":  # labels are random: the full operator with the same seed (tested elsewhere)
        return FisherOperator(model, None, batch, seed=3).to_dense()
    return KFACOperator(model, None, batch).to_dense()


@pytest.mark.parametrize("matrix", ["hessian", "ggn", "fisher", "empirical-fisher", "kfac"])
def test_blocks_are_the_diagonal_blocks_of_the_dense_matrix(matrix):
    model, batch = tiny()
    ref = full_reference(matrix, model, batch)
    blocks = parameter_blocks(model, per_layer=True)
    assert [b.name for b in blocks] == ["0", "2"] and [b.numel for b in blocks] == [42, 24]
    rows = block_curvature(model, None, batch, blocks, matrix=matrix, top_k=3, tol=1e-10, trace_matvecs=100,
                           density=True, density_steps=50, seed=3)
    start = 0
    for blk, row in zip(blocks, rows):
        A = ref[start:start + blk.numel, start:start + blk.numel]
        start += blk.numel
        ev = torch.linalg.eigvalsh(A)
        assert torch.allclose(torch.tensor(row.top, dtype=torch.float64), ev.flip(0)[:3], rtol=1e-7, atol=1e-10), (blk.name, row.top)
        assert row.trace == pytest.approx(float(ev.sum()), rel=1e-9, abs=1e-12)
        assert row.num_params == blk.numel and row.converged
        if matrix == "hessian":  # the block's Morse index from its density against the dense count
            m = row.morse_index()
            assert abs(m.value - float((ev < 0).double().mean())) <= 4 * m.std_error + 0.02


def test_estimated_block_trace_is_within_its_stderr_and_blocks_add_up():
    model, batch = tiny()
    ref = dense_hessian(model, F.cross_entropy, batch)
    blocks = parameter_blocks(model, "0.weight,0.bias+2")
    assert [b.name for b in blocks] == ["0.weight", "0.bias+2"] and [b.numel for b in blocks] == [35, 31]
    rows = block_curvature(model, None, batch, blocks, top_k=1, trace_matvecs=8, seed=1)
    idx = [list(range(35)), list(range(35, 66))]
    for row, ix in zip(rows, idx):
        exact = float(ref[ix][:, ix].trace())
        assert row.trace_method == "gauss-newton" and row.trace_stderr > 0
        assert abs(row.trace - exact) <= 4 * row.trace_stderr + 1e-9


def test_parameter_blocks_of_a_gradlab_net_and_bad_patterns():
    from gradlab.data import load_dataset
    from gradlab.models import build_model

    net = build_model("mlp", load_dataset("digits").spec, width=8, depth=2)
    assert [b.name for b in parameter_blocks(net, per_layer=True)] == ["blocks.0", "blocks.1", "head"]
    assert [b.name for b in parameter_blocks(net, "blocks.*", per_layer=True)] == ["blocks.0", "blocks.1"]
    assert [b.names for b in parameter_blocks(net, "*.bias")] == [["blocks.0.f.0.bias", "blocks.1.f.0.bias", "head.bias"]]
    with pytest.raises(GradlabError, match="'fc9' matches no trainable parameter; names are: blocks.0.f.0.weight"):
        parameter_blocks(net, "head,fc9")
    with pytest.raises(GradlabError, match="invalid params 'head,'"):
        parameter_blocks(net, "head,")


def test_coordinate_operator_is_the_principal_submatrix():
    A = torch.randn(9, 9, dtype=torch.float64)
    A = A + A.T
    idx = torch.tensor([0, 4, 7])
    from gradlab.curvature import DenseOperator

    sub = CoordinateOperator(DenseOperator(A), idx).to_dense()
    assert torch.equal(sub, A[idx][:, idx])
    with pytest.raises(GradlabError, match="coordinates must be"):
        CoordinateOperator(DenseOperator(A), torch.tensor([9]))


# ------------------------------------------------------------------ CLI, a user model
USER = '''
from torch import nn
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.feat = nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.ReLU())
        self.out = nn.Linear(6, 10)
    def forward(self, x):
        return self.out(self.feat(x))
def make(spec):
    return Net()
'''


def test_cli_per_layer_on_a_user_model(capsys, tmp_path, monkeypatch):
    import pandas as pd
    from clihelp import cli

    (tmp_path / "cp_user_net.py").write_text(USER)
    monkeypatch.chdir(tmp_path)
    args = ["probe", "hessian", "--runs-dir", tmp_path / "runs", "--model", "cp_user_net:make", "--batches", "1",
            "--batch-size", "32", "--top-k", "2", "--bottom-k", "0", "--trace-matvecs", "8", "--per-layer", "--density"]
    r = cli(capsys, *args)
    assert r.code == 0, r.err
    df = pd.read_csv(r.run_path / "hessian_blocks.csv")
    assert list(df["block"]) == ["(model)", "feat.1", "out"] and list(df["num_params"]) == [460, 390, 70]
    assert {"lambda_1", "lambda_2", "trace", "trace_stderr", "morse_index"} <= set(df.columns)
    assert (df["lambda_1"][1:] <= df["lambda_1"][0] * (1 + 1e-4)).all()  # Cauchy interlacing
    assert df["trace"][1:].sum() == pytest.approx(df["trace"][0], rel=1e-4)  # piecewise linear: exact traces
    assert (r.run_path / "plots" / "hessian_blocks.png").is_file()
    assert (r.run_path / "hessian_blocks_density.csv").is_file()
    assert max(len(line) for line in r.out.splitlines() if "│" in line or "┃" in line) <= 80
    assert "per block" in r.out and "feat.1" in r.out
    r = cli(capsys, *args[:-2], "--params", "out,nosuch")
    assert r.code == 2 and "'nosuch' matches no trainable parameter" in r.err and len(r.err.strip().splitlines()) == 1
