"""``gradlab probe hessian --matrix``: the probe's solvers on the GGN, Fisher and empirical Fisher."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradlab.core.errors import GradlabError
from gradlab.curvature import EmpiricalFisherOperator, FisherOperator, GGNOperator, KFACOperator
from gradlab.probes.hessian import hessian_probe

DENSE = {"ggn": GGNOperator, "empirical-fisher": EmpiricalFisherOperator, "kfac": KFACOperator,
         "fisher": lambda m, l, d, seed: FisherOperator(m, l, d, mc_samples=1, seed=seed)}


def net_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    g = torch.Generator().manual_seed(0)
    return model, (torch.rand(30, 5, dtype=torch.float64, generator=g), torch.randint(0, 3, (30,), generator=g))


@pytest.mark.parametrize("matrix", list(DENSE))
@pytest.mark.parametrize("exact", [False, True])
def test_probe_reports_the_chosen_matrix(matrix, exact):
    model, batch = net_and_batch()
    make = DENSE[matrix]
    ref = (make(model, None, batch, seed=4) if matrix == "fisher" else make(model, None, batch)).to_dense()
    ev = torch.linalg.eigvalsh(ref)
    rep = hessian_probe(model, batch, top_k=2, bottom_k=1, tol=1e-8, trace_matvecs=200, seed=4, matrix=matrix,
                        exact=exact)
    assert rep.matrix == matrix
    assert torch.allclose(torch.tensor(rep.top, dtype=torch.float64), ev.flip(0)[:2], rtol=1e-6)
    assert abs(rep.trace - float(ev.sum())) <= (1e-9 if exact else 4 * rep.trace_stderr + 1e-9)
    if matrix == "kfac" and not exact:  # from the factors, without products
        assert rep.trace_method == "exact (K-FAC factors)" and rep.trace == pytest.approx(float(ev.sum()), rel=1e-10)
    # the point type needs the Hessian's signs: a PSD matrix must not make every point a "minimum"
    assert rep.classification.kind in ("unknown", "not-critical")
    assert any("not of the Hessian" in n for n in rep.notes)


def test_gauss_newton_trace_is_refused_for_other_matrices_and_names_are_checked():
    model, batch = net_and_batch()
    with pytest.raises(GradlabError, match="estimates the Hessian's trace; with matrix 'ggn' choose auto"):
        hessian_probe(model, batch, trace_method="gauss-newton", matrix="ggn")
    with pytest.raises(GradlabError, match="unknown curvature matrix 'gnn'; choose from: hessian, ggn"):
        hessian_probe(model, batch, matrix="gnn")
    hess = hessian_probe(model, batch, top_k=1, bottom_k=1, trace=False)
    assert hess.matrix == "hessian" and not any("not of the Hessian" in n for n in hess.notes)


def test_cli_matrix_option(capsys, tmp_path):
    import pandas as pd
    from clihelp import cli

    tiny = ["--width", "12", "--depth", "1", "--batches", "1", "--batch-size", "64", "--top-k", "2",
            "--trace-matvecs", "8", "--quiet"]
    r = cli(capsys, "probe", "hessian", "--runs-dir", tmp_path, "--matrix", "empirical-fisher", *tiny)
    assert r.code == 0, r.err
    df = pd.read_csv(r.run_path / "hessian.csv")
    top = df[(df.kind == "eigenvalue") & (df["index"] > 0)]["value"]
    assert len(top) == 2 and (top > 0).all()
    assert "not of the Hessian" in r.out and ("point: unknown" in r.out or "point: not-critical" in r.out)
    r = cli(capsys, "probe", "hessian", "--runs-dir", tmp_path, "--matrix", "fischer")
    assert r.code == 2 and "invalid matrix: 'fischer'" in r.err and len(r.err.strip().splitlines()) == 1
