"""``probe hessian --verify``: small disagreement on a correct operator, a large one on a wrong one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradlab.curvature import CurvatureOperator
from gradlab.probes.hessian_verify import VERIFY_COLUMNS, verify_curvature


def tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    g = torch.Generator().manual_seed(0)
    return model, (torch.rand(30, 5, dtype=torch.float64, generator=g), torch.randint(0, 3, (30,), generator=g))


class Perturbed(CurvatureOperator):
    """The operator plus ``0.3 ||A|| u u^T`` for a fixed unit ``u``: a deliberately wrong matrix."""

    def __init__(self, op):
        super().__init__(op.n, op.dtype, op.device)
        self.op = op
        self.u = torch.nn.functional.normalize(torch.randn(op.n, generator=torch.Generator().manual_seed(9),
                                                           dtype=op.dtype), dim=0)

    def _matmat(self, V):
        return self.op.matmat(V) + 0.3 * torch.outer(self.u, self.u @ V)


@pytest.mark.parametrize("matrix", ["hessian", "ggn", "fisher", "empirical-fisher", "kfac"])
def test_correct_operator_agrees(matrix):
    model, batch = tiny()
    v = verify_curvature(model, None, batch, matrix=matrix, size=30, top_k=3, tol=1e-8, seed=1)
    assert v.size == 30 and v.of == 66 and v.consistent, v.line()
    assert v.eig_error < 1e-9 and v.product_error < 1e-12
    assert list(v.frame().columns) == VERIFY_COLUMNS and "consistent" in v.line()


def test_wrong_operator_disagrees():
    model, batch = tiny()
    v = verify_curvature(model, None, batch, size=30, top_k=3, tol=1e-8, seed=1, transform=Perturbed)
    assert not v.consistent and v.product_error > 1e-2 and v.eig_error > 1e3 * v.eig_bound
    assert "DISAGREE" in v.line()


def test_cli_verify_rows(capsys, tmp_path):
    import pandas as pd
    from clihelp import cli

    r = cli(capsys, "probe", "hessian", "--runs-dir", tmp_path, "--width", "8", "--depth", "1", "--batches", "1",
            "--batch-size", "32", "--top-k", "2", "--bottom-k", "0", "--trace-matvecs", "8", "--verify",
            "--verify-size", "20", "--params", "head", "--quiet")
    assert r.code == 0, r.err
    df = pd.read_csv(r.run_path / "hessian_verify.csv")
    assert list(df.kind) == ["eigenvalue", "eigenvalue", "trace", "product"]
    assert "verify (20 random coordinates of 90" in r.out
