"""``--residual-scale EPS`` (MLP blocks h + eps f(h)) and the Jacobian probe's log|det J| and
eps tr(A) of square block maps, against torch.func Jacobians."""

from __future__ import annotations

import pytest
import torch

from gradlab.core.errors import GradlabError
from gradlab.models import build_model
from gradlab.probes.jacobian import jacobian_probe
from gradlab.probes.jacobian_spectra import log_det_and_trace


class Spec:
    input_shape = (6,)
    num_classes = 3
    mean, std = [0.5], [0.25]


def net(eps, depth=4, act="tanh", seed=0):
    torch.manual_seed(seed)
    opts = {"depth": depth, "width": 5, "act": act}
    if eps is not None:
        opts["residual_scale"] = eps
    return build_model("mlp", Spec(), **opts).double()


def test_blocks_compute_h_plus_eps_f():
    m = net(0.3)
    h = torch.randn(4, 5, dtype=torch.float64)
    block = m.blocks[1]
    assert block.residual and block.scale == 0.3
    assert torch.allclose(block(h), h + 0.3 * block.f(h))
    assert not m.blocks[0].residual  # input dim 6 -> width 5: plain
    ident = net(0.0).blocks[2]
    assert torch.equal(ident(h), h)
    assert not net(None).blocks[1].residual  # no option: plain blocks as before
    with pytest.raises(GradlabError, match="invalid residual_scale"):
        build_model("mlp", Spec(), residual_scale=-1.0)


@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_log_det_and_eps_trace_against_torch_func(eps):
    m = net(eps)
    x = torch.rand(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    rep = jacobian_probe(m, x, method="dense")
    acts = m.block_inputs(x)
    for i in (1, 2, 3):
        block = m.blocks[i]
        ls = rep.map(f"blocks.{i}")
        J = torch.func.vmap(torch.func.jacrev(lambda v: block(v[None])[0]))(acts[i])
        A = torch.func.vmap(torch.func.jacrev(lambda v: block.f(v[None])[0]))(acts[i])
        ref_logdet = torch.stack([torch.log(torch.det(j).abs()) for j in J])
        assert torch.allclose(ls.log_abs_det, ref_logdet, atol=1e-10)
        assert torch.allclose(ls.trace_minus_n, eps * torch.einsum("bii->b", A), atol=1e-10)
        assert ls.stats()["mean_log_abs_det"] == pytest.approx(float(ref_logdet.detach().mean()), abs=1e-10)
    assert rep.map("blocks.0").log_abs_det is None  # 6 -> 5 is not square
    met = rep.metrics()
    per = [float(rep.map(f"blocks.{i}").log_abs_det.mean()) for i in (1, 2, 3)]
    assert met["block_log_abs_det"] == pytest.approx(sum(per) / 3, abs=1e-10)
    if eps == 0.0:
        assert met["block_log_abs_det"] == 0.0 and met["block_trace_minus_n"] == 0.0


def test_small_eps_log_det_is_eps_trace_to_first_order():
    """log det(I + eps A) - eps tr(A) = O(eps^2): small against eps tr(A), and 4x for 2x eps."""
    x = torch.rand(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    gaps = []
    for eps in (1e-3, 2e-3):
        met = jacobian_probe(net(eps), x, method="dense").metrics()
        gaps.append(met["block_log_abs_det"] - met["block_trace_minus_n"])
        assert abs(gaps[-1]) < 5e-3 * abs(met["block_trace_minus_n"])
    assert 3.5 < gaps[1] / gaps[0] < 4.5


def test_singular_map_is_minus_inf():
    j = torch.zeros(2, 3, 3, dtype=torch.float64)
    j[1] = torch.eye(3) * 2
    logdet, tr = log_det_and_trace(j)
    assert logdet[0] == float("-inf") and logdet[1] == pytest.approx(3 * torch.log(torch.tensor(2.0)).item())
    assert tr.tolist() == [-3.0, 3.0]


def test_probe_cli_fresh_model_with_residual_scale(capsys, tmp_path):
    from clihelp import cli

    res = cli(capsys, "probe", "jacobian", "--model", "mlp", "--depth", "3", "--width", "8", "--residual-scale",
              "0.5", "--examples", "4", "--runs-dir", tmp_path, "--quiet")
    assert res.code == 0, res.err
    import pandas as pd

    summary = pd.read_csv(res.run_path / "summary.csv")
    assert "block_log_abs_det" in summary.columns
    table = pd.read_csv(res.run_path / "jacobian_summary.csv")
    assert table.set_index("layer").loc["blocks.1", "mean_log_abs_det"] == table.set_index("layer").loc[
        "blocks.1", "mean_log_abs_det"]  # a number, not NaN
